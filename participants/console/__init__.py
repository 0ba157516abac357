"""The web console (``walsaga console``, extra ``walsaga[console]``): server-rendered pages
over the tracker's and the orchestrators' databases, read-only unless started with an
operator token."""

from participants.console.app import create_app

__all__ = ["create_app"]
