"""One module per ``bastion`` subcommand; each public module defines ``register(subparsers)``."""
