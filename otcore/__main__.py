"""``python -m otcore`` runs the command line."""

from .cli import entry

entry()
