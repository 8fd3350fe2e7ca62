"""Image grids, written the same way by the trainer (samples/) and by sample.py: white 2-pixel gutters.

The layout and the 8-bit rounding are torchvision's ``make_grid`` and ``save_image`` (the same bytes: a test
compares them), written here because importing torchvision loads its models and torch._dynamo, seconds that
writing a grid of prior samples does not need.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from utils.files import written_whole

PAD = 2             # pixels between tiles
LABEL_MARGIN = 90   # pixels left of a grid for row labels


def save_grid(images: torch.Tensor, path: Path, per_row: int) -> None:
    """Images (N, C, H, W) in [0, 1] as one PNG, ``per_row`` tiles a row; written whole or not at all."""
    levels = grid(images, per_row).mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8)
    with written_whole(path) as tmp:
        Image.fromarray(levels.numpy()).save(tmp)


def save_whole(image: Image.Image, path: Path, **options) -> None:
    """A PIL image (an animated GIF with ``options``) written whole or not at all: a full disk leaves no torn
    file under ``path``."""
    with written_whole(path) as tmp:
        image.save(tmp, **options)


def grid(images: torch.Tensor, per_row: int) -> torch.Tensor:
    """The grid ``save_grid`` writes, as a (3, H, W) tensor in [0, 1]: greyscale tiles as RGB, one image alone
    without gutters."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if len(images) == 1:
        return images[0]
    n, channels, h, w = images.shape
    cols = min(per_row, n)
    rows = math.ceil(n / cols)
    out = images.new_full((channels, rows * (h + PAD) + PAD, cols * (w + PAD) + PAD), 1.0)
    for k, image in enumerate(images):
        top, left = PAD + (k // cols) * (h + PAD), PAD + (k % cols) * (w + PAD)
        out[:, top:top + h, left:left + w] = image
    return out


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [0, 1] -> an 8-bit RGB or greyscale PIL image (rounded to the nearest level)."""
    arr = image.mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def save_pairs(originals: torch.Tensor, recons: torch.Tensor, path: Path, per_row: int = 8) -> None:
    """Each row of originals directly above its row of reconstructions."""
    rows = []
    for a, b in zip(originals.split(per_row), recons.split(per_row)):
        rows += [a, b]
    save_grid(torch.cat(rows), path, per_row)


def labelled_rows(images: torch.Tensor, per_row: int, labels: list[str]) -> Image.Image:
    """A grid with a text margin on the left and one label per row of tiles (e.g. a traversal's dimensions)."""
    tiles = to_pil(grid(images, per_row))
    canvas = Image.new("RGB", (tiles.width + LABEL_MARGIN, tiles.height), "white")
    canvas.paste(tiles, (LABEL_MARGIN, 0))
    draw = ImageDraw.Draw(canvas)
    tile = images.shape[-2]
    for r, text in enumerate(labels):
        draw.text((4, PAD + r * (tile + PAD) + tile // 2 - 6), text, fill="black")
    return canvas
