"""Processes and adapters that wire the entitlement domain to infrastructure."""

import os
import signal
import sys
from importlib import metadata

if os.path.basename(sys.argv[0]) == "entitle":
    # Run as the `entitle` command: a Ctrl-C while its modules load (a second
    # or two) ends it quietly, not with a traceback of an import; the CLI's
    # main() puts Python's own handling back.
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def version() -> str:
    """The installed package's version ("0" when run from a bare checkout)."""
    try:
        return metadata.version("entitle")
    except metadata.PackageNotFoundError:
        return "0"
