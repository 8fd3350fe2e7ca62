"""Errors a user can fix, and the one place they are turned into a clean exit."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input: reported as one line naming the problem and the fix, exit code 2."""


class CliParser(argparse.ArgumentParser):
    """argparse whose errors (a flag without its value, a bad --n) are one line and exit 2 like every other."""

    def error(self, message: str):
        raise UserError(f"{message}: see python {self.prog} --help")


class Interrupted(Exception):
    """A run stopped on a signal after saving its state: the message says how to resume; exit 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.code = 128 + signum


def guarded_main(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
    """Call ``main(argv)``; a ``UserError`` becomes ``error: ...`` on stderr and exit 2.

    ``--debug`` anywhere in argv shows the full traceback instead. An ``Interrupted``
    run prints its resume hint and exits 128 + the signal (130 for Ctrl-C), as a shell
    expects; any other Ctrl-C exits 130 with one line, not a traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        try:
            main(argv)
            leave_process_group()
        except (OSError, ValueError) as e:
            unusable = unusable_path(e)
            if unusable is None:
                raise
            raise UserError(unusable) from e
    except UserError as e:
        if debug:
            raise
        lines = str(e).strip().splitlines() or [""]  # a DataLoader worker's error arrives with its traceback
        print(f"error: {lines[-1].split('UserError: ', 1)[-1]}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        leave_process_group(meet=False)


def unusable_path(e: BaseException) -> str | None:
    """The one-line error for a path the operating system refuses to look at, wherever it was given (a name
    longer than the file system allows, a NUL character), or None for any other error."""
    if isinstance(e, OSError) and e.errno == errno.ENAMETOOLONG:
        name = str(e.filename)
        shown = name if len(name) < 60 else f"{name[:40]}...{name[-12:]}"
        return f"the path {shown} is too long for the file system ({len(name)} characters): give a shorter one"
    if isinstance(e, ValueError) and "embedded null" in str(e):
        return "a path given contains a NUL character: give it without one"
    return None


def leave_process_group(meet: bool = True) -> None:
    """Destroy the torch.distributed group if this process joined one (``accelerate launch``): left to the
    interpreter's exit, gloo's threads can abort a process that finished well ("terminate called without an
    active exception", exit -6). ``meet``: every process finished, so they first meet at a barrier: a process
    that tears gloo down while its peer is still finishing the last collective aborts the same way on a loaded
    CPU. (Not on an error's way out, where a peer may never come.) A process that never loaded
    torch.distributed joined none, and is not made to load torch on its way out (--help, a bad option)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        if meet:
            dist.barrier()
        dist.destroy_process_group()


def torch_weights(path: str, key: str, expected: str) -> tuple[bytes, Any]:
    """A torch weights file's bytes and what ``torch.load(weights_only=True)`` reads from them (anything that could
    run code is refused), or a one-line error naming the flag or config ``key`` and the ``expected`` file: the one
    check behind every weights file a user supplies (the FID's Inception, the LPIPS backbone)."""
    import io
    import pickle

    import torch

    try:
        data = Path(path).read_bytes() if Path(path).is_file() else None
    except (OSError, ValueError) as e:  # a name too long, a NUL character, no permission
        raise UserError(f"{key} {path!r} cannot be read ({e.__class__.__name__}): pass the file {expected}") from None
    if data is None:
        raise UserError(f"{key} {path} not found: pass the file {expected}")
    try:
        return data, torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln), "not plain tensors")
        raise UserError(f"refused to load {key} {path}: it holds more than tensors ({detail}), so it could run "
                        f"code; use the official {expected}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{key} {path} is not a torch weights file ({str(e).splitlines()[0]}): pass "
                        f"{expected}") from None
