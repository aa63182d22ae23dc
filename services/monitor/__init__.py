"""The monitor: health checks, alert delivery and the periodic rq jobs.

Consumes: ``alerts`` in group ``monitor``, acknowledged once its delivery job is enqueued (or it
is logged, with no webhook set).
Produces: the health and problem keys (:class:`shared.keys.MonitorKeys`), rq jobs on its queue
(run by ``python -m services.monitor.worker``: alert webhooks, balance refresh, daily summary).
Run it with ``python -m services.monitor``; see :mod:`services.monitor.service`.
"""
