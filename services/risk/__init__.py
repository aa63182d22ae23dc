"""Risk: intents in, approved orders or rejections out (``python -m services.risk``).

Consumes: ``intents`` in group ``risk``. Produces: orders on ``orders``, refusals on
``rejections``, protection locks on ``alerts``, reservations in the portfolio. An intent is
acknowledged once its decision is published, or once it waits in the deferred queue.
:mod:`services.risk.service` holds the guarantee; docs/RISK.md the order of checks.
"""
