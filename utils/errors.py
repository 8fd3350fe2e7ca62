"""Errors a user can fix, and the one place they are turned into a clean exit."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input: reported as one line naming the problem and the fix, exit code 2."""


def run_cli(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; a ``UserError`` becomes ``error: ...`` on stderr and exit 2.

    ``--debug`` anywhere in argv shows the full traceback instead.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        main(argv)
    except UserError as e:
        if debug:
            raise
        lines = str(e).strip().splitlines() or [""]  # a DataLoader worker's error arrives with its traceback
        print(f"error: {lines[-1].split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
