"""Data sets: real CelebA faces, CIFAR-10 and official-layout CelebA on files written in the real formats,
dSprites' factor grid and renderer, image folders, caching, and the errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from conftest import DATA, REPO, train, train_cli
from utils.config import DataConfig
from utils.data import dsprites
from utils.data.dsprites import DSpritesImages
from utils.data.registry import load_data
from utils.data.splits import FileImages, TensorImages, crop_box
from utils.errors import UserError
from utils.training.run_folder import read_metrics

CELEBA = DATA / "celeba-10k"


def test_celeba_crop_scales_with_the_image():
    assert crop_box(178, 218, face_crop=True) == (19, 39, 140)  # the standard 140 px crop of the official size
    assert crop_box(89, 109, face_crop=True) == (9, 19, 70)     # the half-size copies here: half the crop
    assert crop_box(50, 30, face_crop=False) == (10, 0, 30)     # other folders: the centred square


def test_real_celeba_faces(real_data):
    train_set, test_set, summary = load_data(DataConfig(name="celeba", root=str(CELEBA), num_workers=0))
    assert len(train_set) + len(test_set) == 10_000 and len(test_set) == 500
    # all 10,000 files are in the official train range, so the held-out split is the seeded fraction
    assert "seeded 0.05 fraction (no image in the official test range)" in summary
    assert isinstance(train_set, FileImages) and train_set.workers_needed
    x = train_set.get(torch.tensor([0, 1, 2, 3]))
    assert x.shape == (4, 3, 64, 64) and x.dtype == torch.uint8
    assert x.min() < 40 and x.max() > 200  # real photographs use the range
    assert not set(map(str, test_set.paths)) & set(map(str, train_set.paths))
    again, _, _ = load_data(DataConfig(name="celeba", root=str(CELEBA), num_workers=0))
    assert again.paths == train_set.paths  # the split is fixed


def test_celeba_training_steps(tmp_path, real_data):
    run = tmp_path / "celeba"
    res = train(run, "configs/celeba.yaml", [f"data.root={CELEBA}", "train.steps=3", "train.batch_size=8",
                                              "model.base_width=4", "model.z_dim=8", "data.num_workers=2",
                                              "train.eval_every=3", "train.eval_samples=16", "train.sample_every=3"])
    assert "data: celeba train=9500 test=500 shape=3x64x64" in res.stdout
    rows = read_metrics(run)
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["split"] == "test"] == [3]
    with Image.open(run / "samples" / "step_0000003_samples.png") as im:  # 8 x 8 colour faces of 64 px
        assert im.mode == "RGB" and im.size == (8 * 66 + 2, 8 * 66 + 2)
    with Image.open(run / "samples" / "step_0000003_recon.png") as im:  # 32 test faces, rows of 8 above their
        assert im.mode == "RGB" and im.size == (8 * 66 + 2, 8 * 66 + 2)   # reconstructions


def _write_celeba_official(root, n=12):
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    g = np.random.default_rng(0)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]
    for name in names:
        Image.fromarray(g.integers(0, 255, (218, 178, 3), dtype=np.uint8)).save(base / "img_align_celeba" / name)
    parts = [0] * 8 + [1] * 2 + [2] * 2
    (base / "list_eval_partition.txt").write_text("".join(f"{f} {p}\n" for f, p in zip(names, parts)))
    (base / "identity_CelebA.txt").write_text("".join(f"{f} {i}\n" for i, f in enumerate(names)))
    attrs = " ".join(f"Attr_{k}" for k in range(40))
    (base / "list_attr_celeba.txt").write_text(f"{n}\n{attrs}\n" + "".join(
        f"{f} " + " ".join("1" if (i + k) % 2 else "-1" for k in range(40)) + "\n" for i, f in enumerate(names)))
    (base / "list_bbox_celeba.txt").write_text(f"{n}\nimage_id x_1 y_1 width height\n" + "".join(
        f"{f} 95 71 226 313\n" for f in names))
    marks = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    (base / "list_landmarks_align_celeba.txt").write_text(f"{n}\n{marks}\n" + "".join(
        f"{f} 69 109 106 113 77 142 73 152 108 154\n" for f in names))
    return names


def test_celeba_official_layout_through_torchvision(tmp_path, monkeypatch):
    names = _write_celeba_official(tmp_path)
    # torchvision checks the MD5 of the real annotation files; these are small copies in the same format
    monkeypatch.setattr(torchvision.datasets.CelebA, "_check_integrity", lambda self: True)
    train_set, test_set, summary = load_data(DataConfig(name="celeba", root=str(tmp_path), num_workers=0))
    assert "torchvision CelebA" in summary
    assert [p.name for p in train_set.paths] == names[:8] and [p.name for p in test_set.paths] == names[10:]
    assert train_set.get(torch.tensor([0])).shape == (1, 3, 64, 64)


def test_celeba_partition_file_without_torchvision(tmp_path):
    names = _write_celeba_official(tmp_path)
    # the MD5 check fails on these copies: the folder and its partition file are used directly
    train_set, test_set, summary = load_data(DataConfig(name="celeba", root=str(tmp_path), num_workers=0))
    assert "official partition (list_eval_partition.txt)" in summary
    assert [p.name for p in train_set.paths] == names[:8] and [p.name for p in test_set.paths] == names[10:]


def test_celeba_official_index_ranges(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for name in ("000001.jpg", "162770.jpg", "182638.jpg", "202599.jpg"):
        Image.new("RGB", (178, 218), (200, 100, 50)).save(folder / name)
    train_set, test_set, summary = load_data(DataConfig(name="celeba", root=str(tmp_path), num_workers=0))
    assert "official index ranges" in summary
    assert [p.name for p in test_set.paths] == ["182638.jpg", "202599.jpg"]
    assert [p.name for p in train_set.paths] == ["000001.jpg", "162770.jpg"]


def test_cifar10_from_its_pickled_batches(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    g = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = g.integers(0, 256, (4, 3072), dtype=np.uint8)  # rows: 1024 red, 1024 green, 1024 blue
        labels = g.integers(0, 10, 4).tolist()
        written[name] = (data, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data,
                         "filenames": [f"{name}_{i}.png" for i in range(4)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 4,
                     "num_vis": 3072}, f)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)  # the MD5 of the real files
    train_set, test_set, summary = load_data(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    assert isinstance(train_set, TensorImages) and train_set.shape == (3, 32, 32) and len(train_set) == 20
    data, labels = written["test_batch"]
    assert torch.equal(test_set.images, torch.from_numpy(data).view(4, 3, 32, 32))
    assert test_set.labels.tolist() == labels
    assert "train=20 test=4 shape=3x32x32" in summary


def test_dsprites_factor_grid_and_renderer():
    assert dsprites.N_IMAGES == 737_280 == len(load_data(DataConfig(name="dsprites", root="nowhere"))[0]) + \
        len(load_data(DataConfig(name="dsprites", root="nowhere"))[1])
    ds = DSpritesImages(torch.arange(dsprites.N_IMAGES))

    def img(shape=0, scale=3, orient=0, x=16, y=16) -> torch.Tensor:
        i = dsprites.classes_to_index(torch.tensor([[shape, scale, orient, x, y]]))
        return ds.get(i)[0, 0].float() / 255

    def centroid(m: torch.Tensor) -> tuple[float, float]:
        ys, xs = m.nonzero(as_tuple=True)
        return xs.float().mean().item(), ys.float().mean().item()

    base = img()
    assert set(base.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(img(), base)  # the same index, the same image
    (bx, by), (rx, _), (_, dy) = centroid(base), centroid(img(x=31)), centroid(img(y=31))
    assert rx > bx + 15 and dy > by + 15  # position moves the centroid, x along columns, y along rows
    assert abs(centroid(img(x=31))[1] - by) < 0.5
    areas = [img(scale=s).sum().item() for s in range(6)]
    assert all(a < b for a, b in zip(areas, areas[1:]))  # scale changes the area
    masks = [img(shape=s) for s in range(3)]
    assert all(not torch.equal(masks[a], masks[b]) for a, b in ((0, 1), (0, 2), (1, 2)))  # shape changes the mask
    turned = img(shape=1, orient=10)  # an ellipse a quarter turn round: a new mask, the same area within 10%
    assert not torch.equal(turned, masks[1]) and abs(turned.sum() - masks[1].sum()) < 0.1 * masks[1].sum()
    classes, values = ds.factors_at(torch.tensor([0, dsprites.N_IMAGES - 1]))
    assert classes.tolist() == [[0, 0, 0, 0, 0], [2, 5, 39, 31, 31]]
    assert values[1].tolist() == pytest.approx([3.0, 1.0, 39 * 2 * np.pi / 40, 1.0, 1.0])


def test_dsprites_official_npz(tmp_path):
    n = 6
    imgs = np.zeros((n, 64, 64), dtype=np.uint8)
    for i in range(n):
        imgs[i, 10 + i:20 + i, 5:15] = 1
    classes = np.stack([np.zeros(n), np.arange(n) % 3, np.arange(n) % 6, np.zeros(n), np.arange(n), np.zeros(n)], 1)
    np.savez_compressed(tmp_path / dsprites.OFFICIAL_NAME, imgs=imgs, latents_classes=classes.astype(np.int64),
                        latents_values=classes.astype(np.float64))
    train_set, test_set, summary = load_data(DataConfig(name="dsprites", root=str(tmp_path), test_fraction=0.2,
                                                        cache_dir=str(tmp_path / "cache")))
    assert dsprites.OFFICIAL_NAME in summary and len(train_set) == 5 and len(test_set) == 1
    everything = torch.cat([train_set.indices, test_set.indices]).sort().values
    assert torch.equal(everything, torch.arange(n))
    i = train_set.indices[0].item()
    got = train_set.get(torch.tensor([0]))
    assert torch.equal(got[0, 0], torch.from_numpy(imgs[i]) * 255)
    assert train_set.factors_at(torch.tensor([0]))[0].tolist() == [classes[i, 1:].astype(int).tolist()]
    cached = tmp_path / "cache" / "dsprites_imgs.npy"  # extracted once, memory-mapped
    assert np.array_equal(np.load(cached), imgs)
    stamp = cached.stat().st_mtime_ns
    again, _, _ = load_data(DataConfig(name="dsprites", root=str(tmp_path), test_fraction=0.2,
                                       cache_dir=str(tmp_path / "cache")))
    assert cached.stat().st_mtime_ns == stamp and torch.equal(again.get(torch.tensor([0])), got)  # reused


def _write_folder(root):
    for cls, colour in (("cats", (250, 20, 20)), ("dogs", (20, 20, 250))):
        (root / cls).mkdir(parents=True)
        for i, ext in enumerate(("png", "jpg", "webp", "png", "jpg")):
            Image.new("RGB", (40 + 8 * i, 30), colour).save(root / cls / f"{i}.{ext}")


def test_image_folder_labels_shapes_and_cache(tmp_path):
    _write_folder(tmp_path / "imgs")
    cfg = DataConfig(name="image_folder", root=str(tmp_path / "imgs"), img_size=16, channels=1, test_fraction=0.2,
                     cache_dir=str(tmp_path / "cache"), num_workers=0)
    train_set, test_set, summary = load_data(cfg)
    assert len(train_set) == 8 and len(test_set) == 2 and "labels from 2 sub-folders" in summary
    x = train_set.get(torch.arange(8))
    assert x.shape == (8, 1, 16, 16)
    reds = [p.parent.name == "cats" for p in train_set.paths]
    assert train_set.labels.tolist() == [0 if r else 1 for r in reds]
    cfg.cache = True
    cached, cached_test, summary = load_data(cfg)
    assert isinstance(cached, TensorImages) and "in memory" in summary
    assert torch.equal(cached.images, x) and torch.equal(cached.labels, train_set.labels)
    npy = list((tmp_path / "cache").glob("*.npy"))
    assert len(npy) == 2
    stamp = [p.stat().st_mtime_ns for p in npy]
    load_data(cfg)
    assert [p.stat().st_mtime_ns for p in npy] == stamp  # reused, not rebuilt


def test_data_errors(tmp_path, real_data):
    cases = [
        (DataConfig(name="celeba", root=str(tmp_path)), "CelebA images not found under"),
        (DataConfig(name="image_folder", root=str(tmp_path / "none")), "is not a folder"),
        (DataConfig(name="image_folder", root=str(tmp_path)), "no images (jpg, png, webp) under"),
        (DataConfig(name="mnist", root=str(DATA), channels=3), "mnist is greyscale (1 channel) but data.channels=3"),
        (DataConfig(name="cifar10", root=str(tmp_path), download=False), "CIFAR10 not found in"),
    ]
    for cfg, needle in cases:
        with pytest.raises(UserError) as e:
            load_data(cfg)
        assert needle in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="only 1 image found"):
        load_data(DataConfig(name="image_folder", root=str(tmp_path / "bad")))
    (tmp_path / "bad" / "broken2.jpg").write_bytes(b"\xff\xd8\xff truncated")
    bad, _, _ = load_data(DataConfig(name="image_folder", root=str(tmp_path / "bad"), test_fraction=0.01))
    with pytest.raises(UserError, match="cannot read image .*broken2?.jpg.*remove or replace the file"):
        bad.get(torch.tensor([0]))


def test_corrupt_image_stops_training_with_one_line(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    res = train_cli(["-c", str(REPO / "configs/image_folder.yaml"), "-e", str(tmp_path / "run"), f"data.root={folder}",
                     "data.cache=false", "data.num_workers=2", "train.batch_size=4", "train.steps=2",
                     "data.img_size=32", "model.channel_mults=[1,2]"])
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()  # the DataLoader worker's traceback is not shown, only its message
    assert len(lines) == 1 and lines[0].startswith("error: cannot read image ") and ".jpg" in lines[0], res.stderr
    assert "remove or replace the file" in lines[0]


@pytest.mark.parametrize("name, size", [("MNIST", 28), ("FashionMNIST", 28), ("MNIST", 32)])
def test_idx_sets_read_as_torchvision_reads_them(name, size, real_data):
    """MNIST and Fashion-MNIST read from their IDX files directly give torchvision's tensors, resized alike; a
    damaged or missing file goes to torchvision's class, which says what is wrong (or downloads)."""
    from utils.data.sources import idx_set, torchvision_set

    cfg = DataConfig(root=str(real_data), download=False)
    ours, theirs = idx_set(name, cfg, (1, size, size)), torchvision_set(name, cfg, (1, size, size))
    assert ours[2] == theirs[2]
    for a, b in zip(ours[:2], theirs[:2]):
        assert a.images.dtype == b.images.dtype and torch.equal(a.images, b.images)
        assert a.labels.dtype == b.labels.dtype and torch.equal(a.labels, b.labels)


def test_an_idx_set_without_its_files_is_torchvisions_to_refuse(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\0\0\x08\x03" + (2).to_bytes(4, "big") * 3 + bytes(7))
    with pytest.raises(UserError, match="is damaged"):
        load_data(DataConfig(name="mnist", root=str(tmp_path), download=False))


def test_loading_mnist_imports_no_torchvision(real_data):
    """Reading MNIST's files needs no torchvision, whose import loads its models and the compiler (seconds)."""
    import subprocess
    import sys

    code = (f"import sys; from utils.data.registry import load_data; from utils.config import DataConfig; "
            f"load_data(DataConfig(root={str(real_data)!r}, download=False)); "
            f"print(sorted(m for m in ('torchvision', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
