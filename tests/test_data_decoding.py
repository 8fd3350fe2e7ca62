"""Images decoded faithfully: more than 8 bits a channel scaled by their depth (not clipped white), and every file
that cannot be read named in one line (not an image, truncated, a decompression bomb)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, train_cli
from utils.config import DataConfig, load_config
from utils.data.registry import load_data
from utils.data.splits import decode
from utils.errors import UserError

# 16-bit grey values: multiples of 257 are exact 8-bit levels (65535 = 257 * 255); the others fall between two
GREY16 = np.array([[0, 257, 12850, 32896], [65535, 1000, 30000, 65000], [40000, 5, 65534, 128],
                   [257 * 100, 257 * 200, 257 * 254, 20000]], dtype=np.uint16)


def png(arr: np.ndarray, colour_type: int, depth: int, size: tuple[int, int] | None = None) -> bytes:
    """A PNG file written by hand (Pillow writes no 16-bit RGB): ``arr`` (H, W[, C]) as rows of big-endian
    samples; ``size`` overrides the (width, height) its header declares."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\0" + arr[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", *(size or (w, h)), depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_a_16_bit_grey_png_is_scaled_by_its_depth_not_clipped(tmp_path):
    Image.fromarray(GREY16).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode in ("I;16", "I")  # a real 16-bit file
    x = decode(tmp_path / "deep.png", 4, 1, face_crop=False).float().div(255)[0]
    expected = torch.from_numpy(GREY16.astype(np.float64) / 65535).float()
    exact = torch.from_numpy(GREY16 % 257 == 0)
    assert torch.equal(x[exact], expected[exact])  # value / 65535, to the bit, where 8 bits can hold it
    assert (x - expected).abs().max() <= 0.5 / 255 + 1e-7  # elsewhere the nearest 8-bit level
    assert x.max() == 1.0 and x.min() == 0.0 and len(x.unique()) > 10  # not all white
    rgb = decode(tmp_path / "deep.png", 4, 3, face_crop=False)  # data.channels=3: the grey in every channel
    assert torch.equal(rgb, (x * 255).round().to(torch.uint8).expand(3, 4, 4))


def test_16_bit_rgb_and_float_images_and_an_8_bit_one_beside_them(tmp_path):
    colour = (GREY16[..., None] // np.array([1, 2, 3], dtype=np.uint16)).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(png(colour, 2, 16))
    x = decode(tmp_path / "rgb16.png", 4, 3, face_crop=False)
    assert torch.equal(x, torch.from_numpy((colour >> 8).astype(np.uint8)).permute(2, 0, 1))  # Pillow's high bytes
    levels = (np.arange(16, dtype=np.float32).reshape(4, 4) / 15)
    Image.fromarray(levels, "F").save(tmp_path / "float.tiff")
    assert torch.equal(decode(tmp_path / "float.tiff", 4, 1, False)[0],
                       torch.from_numpy(np.rint(levels * 255).astype(np.uint8)))  # float: [0, 1] already
    Image.fromarray(np.full((4, 4), 2 ** 30, np.int32)).save(tmp_path / "int32.tiff")
    assert decode(tmp_path / "int32.tiff", 4, 1, False).unique().tolist() == [round(255 * 2 ** 30 / (2 ** 31 - 1))]
    eight = (GREY16 >> 8).astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    assert torch.equal(decode(tmp_path / "eight.png", 4, 1, False)[0], torch.from_numpy(eight))  # unchanged


def test_an_image_folder_with_16_bit_and_8_bit_pngs_and_its_cache(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray((GREY16 // (i + 1)).astype(np.uint16)).save(folder / f"deep{i}.png")
        Image.fromarray((GREY16 >> 8).astype(np.uint8)).save(folder / f"flat{i}.png")
    cfg = DataConfig(name="image_folder", root=str(folder), img_size=4, test_fraction=0.25, num_workers=0,
                     cache_dir=str(tmp_path / "cache"))
    train_set, _, _ = load_data(cfg)
    x = train_set.get(torch.arange(len(train_set)))
    for path, img in zip(train_set.paths, x):
        want = (GREY16 // (int(path.stem[-1]) + 1)) / 65535 if "deep" in path.stem else (GREY16 >> 8) / 255
        assert (img[0].float() / 255 - torch.from_numpy(want)).abs().max() <= 0.5 / 255 + 1e-6, path
    cfg.cache = True
    cached, _, _ = load_data(cfg)
    assert torch.equal(cached.images, x)


def test_a_16_bit_image_column_of_a_datasets_set(tmp_path):
    import datasets

    images = [Image.fromarray((GREY16 // (i + 1)).astype(np.uint16)) for i in range(5)]
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images}, features=features).save_to_disk(str(tmp_path / "deep"))
    cfg = load_config(None, ["data.name=hf", f"data.root={tmp_path / 'deep'}", "data.channels=1", "data.img_size=4",
                             "data.hf_test_split=", "data.test_fraction=0.2"]).data
    train_set, test_set, _ = load_data(cfg, 0)
    seen = torch.cat([train_set.get(torch.arange(4)), test_set.get(torch.arange(1))]).float().div(255)
    want = [torch.from_numpy((GREY16 // (i + 1)) / 65535).float() for i in range(5)]
    for img in seen:  # each image is one of the five, to within half an 8-bit step
        assert min((img[0] - w).abs().max().item() for w in want) <= 0.5 / 255 + 1e-6


def _bomb(path) -> None:
    """A valid PNG header declaring 20000 x 20000 pixels (Pillow refuses over 2 x 89.5 M at open), 1 pixel of data."""
    path.write_bytes(png(np.zeros((1, 1), np.uint8), 0, 8, size=(20000, 20000)))


def test_every_unreadable_image_is_named(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _bomb(folder / "bomb.png")
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # a few kB that do not compress
    Image.fromarray(noise).save(folder / "whole.png")
    (folder / "cut.png").write_bytes((folder / "whole.png").read_bytes()[:1000])
    (folder / "text.png").write_text("not an image")
    for name, why in [("bomb.png", "decompression bomb"), ("cut.png", "truncated"), ("text.png", "cannot identify")]:
        with pytest.raises(UserError) as e:
            decode(folder / name, 8, 3, face_crop=False)
        msg = str(e.value)
        assert msg.startswith(f"cannot read image {folder / name} (") and why in msg and "\n" not in msg, msg
        assert msg.endswith("remove or replace the file")


def test_a_decompression_bomb_in_a_datasets_set_is_named(tmp_path):
    import datasets

    folder = tmp_path / "imgs" / "train"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(folder / f"{i}.png")
    _bomb(folder / "3.png")
    cfg = load_config(None, ["data.name=hf", f"data.root={tmp_path / 'imgs'}", "data.channels=1",
                             "data.img_size=8", f"data.cache_dir={tmp_path / 'cache'}"]).data
    try:
        train_set, test_set, _ = load_data(cfg, 0)
    except datasets.exceptions.DatasetGenerationError:  # pragma: no cover - a library that decodes while loading
        pytest.skip("this datasets version reads the images while building the set")
    with pytest.raises(UserError) as e:
        torch.cat([s.get(torch.arange(len(s))) for s in (train_set, test_set)])
    msg = str(e.value)
    assert msg.startswith("cannot read image ") and "3.png" in msg and "decompression bomb" in msg, msg


def test_a_decompression_bomb_stops_training_with_one_line(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        _bomb(folder / f"{i}.png")
    res = train_cli(["-c", str(REPO / "configs/image_folder.yaml"), "-e", str(tmp_path / "run"), f"data.root={folder}",
                     "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
                     "train.batch_size=4", "train.steps=2", "data.img_size=32", "model.channel_mults=[1,2]"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: cannot read image {folder}") and "decompression bomb" in lines[0]
