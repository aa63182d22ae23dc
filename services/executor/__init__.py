"""The executor: approved orders to the broker, the broker's reports to the portfolio.

Consumes: ``orders`` in group ``executor.consumer_group`` (``executor``), and the broker's trade
updates (a websocket, no group). Produces: order records (``<prefix>:order:*``), events on
``order-events``, fills booked in the portfolio, alerts. An order is acknowledged once it is
recorded and submitted, refused, or handed to the chase of an unknown order. Run one per account
with ``python -m services.executor``; :mod:`services.executor.service` holds the guarantees.
"""
