"""The vmfleet controller: ``kopf run -m controller`` (or ``vmfleet controller``)."""

from . import handlers as handlers  # registers the kopf handlers

__all__ = ["handlers"]
