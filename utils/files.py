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
import socket
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` only once the new text is completely written: a crash leaves the old file or the new."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written atomically."""
    write_atomic(path, json.dumps(data, indent=2))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A state dict (or any name -> tensor map) as safetensors, written atomically: detached, contiguous, on
    the CPU, with the permissions any other new file gets (safetensors alone would make it 0600, unreadable to a
    group sharing the file system). On failure the partial file is removed and the error raised (safetensors
    reports a full disk as a SafetensorError, not an OSError)."""
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
    """Delete the ``private_temporary`` files in ``folder`` left by processes of this machine that are no longer
    running (a build killed half-way); those of live processes and of other machines stay. Returns the removed."""
    removed = []
    host = socket.gethostname()
    for tmp in sorted(folder.glob(f"*.{host}.*.tmp")) if folder.is_dir() else []:
        pid = tmp.name[:-len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and tmp.name.endswith(f".{host}.{pid}.tmp") and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


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
    if code == errno.EIO or "input/output error" in text:
        return f"check the disk that holds {where} (an input/output error)"
    return f"fix what stopped the write to {where}"
