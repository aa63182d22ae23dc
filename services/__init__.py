"""Bastion's services: one package each, started as ``python -m services.<name>``."""
