"""The IDX format of MNIST and Fashion-MNIST's official files: reading them, and telling a damaged one by its size.

Torch-free (numpy, imported where it reads), so that counting a set's images and classes for a config, which
reads the label files, loads no torch; loading reads the images through the same function.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

IDX_FILES = (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),  # (images, labels) of the train and test splits
             ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))


def read_idx(path: Path) -> np.ndarray | None:
    """An IDX file of unsigned bytes as an array of its declared dimensions (None: another element type, or no
    header; a ValueError when its size is not what the header declares)."""
    import numpy as np

    data = bytearray(path.read_bytes())  # (writable: a tensor may share its memory)
    if len(data) < 4 or data[2] != 0x08:
        return None
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def damaged_idx_files(folder: Path) -> tuple[Path, str] | None:
    """(the first IDX file in ``folder`` whose size is not the one its header declares, why), or None. The IDX
    header (MNIST, Fashion-MNIST) gives the element type and every dimension, so a truncated or padded file shows
    in its size alone."""
    if not folder.is_dir():
        return None
    for path in sorted(folder.glob("*-ubyte")):
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0":
                return path, "no IDX header"
            ndim, width = head[3], {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}.get(head[2], 0)
            dims = f.read(4 * ndim)
        if not width or len(dims) < 4 * ndim:
            return path, "its header is cut short"
        expected = 4 + 4 * ndim + width * math.prod(int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(ndim))
        if size != expected:
            return path, f"{size:,} bytes where its header declares {expected:,}"
    return None
