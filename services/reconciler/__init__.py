"""The reconciler: the broker's cash, positions and orders against ours.

Consumes: no stream; it reads the broker and our books (portfolio, order records) each pass.
Produces: a report in ``<prefix>:reconciliation`` and on ``stream:reconciliation``, alerts on
``alerts`` when the differences change, repair requests for the executor, and the trading state
(HALTED until the first clean pass, and on a mismatch). Acknowledges nothing.
Run it with ``python -m services.reconciler``; see :mod:`services.reconciler.service`.
"""
