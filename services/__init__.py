"""Processes and adapters that wire the entitlement domain to infrastructure."""

from importlib import metadata


def version() -> str:
    """The installed package's version ("0" when run from a bare checkout)."""
    try:
        return metadata.version("entitle")
    except metadata.PackageNotFoundError:
        return "0"
