"""Writing files so that a crash never leaves half of one, and tensors to and from safetensors.

Every file the toolkit writes into a run folder, a checkpoint or an export goes through here:
the text or tensors are written beside the target and renamed over it, so a reader sees the
old file or the new one, never a torn one. Weights are safetensors only: reading them never
runs code.
"""

from __future__ import annotations

import json
import os
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
    the CPU. On failure the partial file is removed and the error raised (safetensors reports a full disk as a
    SafetensorError, not an OSError)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def tensor_mismatches(expected: dict[str, tuple], found: dict[str, tuple]) -> list[str]:
    """Each tensor name that is missing, unexpected, or of another shape (file shape vs model shape)."""
    problems = [f"{k} missing" for k in expected if k not in found]
    problems += [f"{k} unexpected" for k in found if k not in expected]
    problems += [f"{k} {found[k]} vs {v}" for k, v in expected.items() if k in found and found[k] != v]
    return problems
