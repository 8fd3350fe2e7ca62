"""Writing files so that a crash never leaves half of one, and tensors to and from safetensors.

Every file the toolkit writes into a run folder, a checkpoint or an export goes through here:
the text or tensors are written beside the target and renamed over it, so a reader sees the
old file or the new one, never a torn one. Weights are safetensors only: reading them never
runs code.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` only once the new text is completely written: a crash leaves the old file or the new, and
    a failed write (a full disk, a file-size limit) removes its partial temporary. Text is UTF-8, except that a
    name read from the file system that is not valid UTF-8 (a run folder's, in a command line) is written back
    as the bytes it was, as ``os.fsencode`` would."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` for a writer that takes a file name (PIL, matplotlib): renamed over
    ``path`` when the block ends well, removed when it fails, so ``path`` is never a torn image."""
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.tmp{path.suffix}")  # the suffix tells the writer the format
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically."""
    write_atomic(path, json.dumps(data, indent=2))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A state dict (or any name -> tensor map) as safetensors, written atomically: detached, contiguous, on
    the CPU, with the permissions any other new file gets (safetensors alone would make it 0600, unreadable to a
    group sharing the file system). On failure the partial file is removed and the error raised (safetensors
    reports a full disk as a SafetensorError, not an OSError)."""
    from safetensors.torch import save_file  # (here: the CLIs' checks that use this module load no torch)

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes 0600; readable like every other file here
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's file-creation mask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tensor_mismatches(expected: dict[str, tuple], found: dict[str, tuple]) -> list[str]:
    """Each tensor name that is missing, unexpected, or of another shape (file shape vs model shape)."""
    problems = [f"{k} missing" for k in expected if k not in found]
    problems += [f"{k} unexpected" for k in found if k not in expected]
    problems += [f"{k} {found[k]} vs {v}" for k, v in expected.items() if k in found and found[k] != v]
    return problems


def private_temporary(target: Path) -> Path:
    """A temporary name beside ``target`` that no other process writes: machines sharing a folder each have their
    own (host and process id in the name), and ``remove_stale_temporaries`` can tell whose it is."""
    return target.with_name(f"{target.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the ``private_temporary`` files (and folders) in ``folder`` left by processes of this machine that
    are no longer running (a build killed half-way); those of live processes and of other machines stay. Returns
    the removed."""
    removed = []
    host = socket.gethostname()
    for tmp in sorted(folder.glob(f"*.{host}.*.tmp")) if folder.is_dir() else []:
        pid = tmp.name[:-len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and tmp.name.endswith(f".{host}.{pid}.tmp") and not _alive(int(pid)):
            if tmp.is_dir():  # a folder built aside (an export) by a process that was killed
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def cannot_write(folder: Path) -> OSError | None:
    """Why nothing can be written into ``folder`` (or, when it does not exist yet, into the nearest folder above
    it that does), or None when a file can be created there. Found by creating and removing a file, not by
    permission bits: root ignores those, and a read-only file system or an immutable folder refuses root too."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    probe = private_temporary(folder / ".write-test")
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as e:
        return e
    return None


# errors that mean "the disk or its permissions", not a bug: reported in one line with what to do
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


def is_disk_error(e: BaseException) -> bool:
    """Whether a failed write is the disk's or its permissions' doing: an OSError of ``DISK_ERRORS``, or a
    writer's own error carrying the system's text (safetensors reports a full disk as a SafetensorError)."""
    if isinstance(e, OSError):
        return e.errno in DISK_ERRORS
    text = str(e).lower()
    return any(s in text for s in ("no space", "file too large", "quota", "read-only", "permission denied"))


def write_failure(e: BaseException, target: Path, then: str = "") -> str:
    """The one line for a write that failed: what, the system's reason, and the advice for its cause."""
    lines = str(e).strip().splitlines()
    reason = getattr(e, "strerror", None) or (lines[-1] if lines else e.__class__.__name__)
    return f"could not write {target} ({reason}): {disk_advice(e, Path(target).parent)}" + (f", {then}" if then
                                                                                           else "")


def disk_advice(e: BaseException, where: Path) -> str:
    """What to do about a failed write, for its cause: a full disk, a file-size limit, permissions, the disk itself.
    Reads the errno of an OSError, else the message (safetensors and torch report the OS's text)."""
    code = getattr(e, "errno", None)
    text = str(e).lower()
    if code in (errno.ENOSPC, errno.EDQUOT) or "no space" in text or "quota" in text:
        return f"free disk space where {where} is (the disk or the quota is full)"
    if code == errno.EFBIG or "file too large" in text:
        return "raise the file-size limit of the shell that runs training (ulimit -f)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS) or "permission denied" in text or "read-only" in text:
        return f"make {where} writable (its permissions, or a read-only file system)"
    if code == errno.ENOTDIR or "not a directory" in text:
        return f"a folder on the path {where} is a file: rename that file or choose another path"
    if code == errno.EIO or "input/output error" in text:
        return f"check the disk that holds {where} (an input/output error)"
    return f"fix what stopped the write to {where}"
