"""The reconciler service: broker truth against ours (see :mod:`services.reconciler.service`)."""
