"""The ``bastion`` command: watch and steer a running desk from a shell.

Consumes nothing from the streams as a group member: it reads keys and streams, and writes only
through the same library calls the services use (the kill switch, an order intent on the
intents stream, the portfolio's verify). Each subcommand is a module in
:mod:`services.cli.commands`; :mod:`services.cli.service` parses and dispatches.
"""
