"""The monitor (scheduler) service, its checks and its rq jobs (see :mod:`services.monitor.service`)."""
