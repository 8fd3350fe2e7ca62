"""The feature network of the toolkit's own (utils/evaluation/features.py): trained on real MNIST and CelebA
faces, reproducible bit for bit, never shown the held-out split, and refused in one line when it cannot serve."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import DATA, REPO
from utils.config import load_config
from utils.data.registry import load_data
from utils.data.splits import TensorImages
from utils.errors import UserError, guarded_main
from utils.evaluation import feature_training as ft
from utils.evaluation import features
from utils.inference import features as cli


def mnist(real_data):
    return load_data(load_config(REPO / "configs/mnist.yaml", [f"data.root={real_data}"]).data)


def subset(split: TensorImages, n: int, labels: bool = True) -> TensorImages:
    return TensorImages(split.images[:n].clone(), split.labels[:n].clone() if labels else None)


def test_nt_xent_is_its_definition():
    """Against the formula of Chen et al. (2020), eq. 1, written out view by view in float64."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    total = 0.0
    for i in range(8):
        j = (i + 4) % 8
        den = sum(math.exp(z[i] @ z[k] / 0.5) for k in range(8) if k != i)
        total += -math.log(math.exp(z[i] @ z[j] / 0.5) / den)
    assert ft.nt_xent(z1, z2, 0.5).item() == pytest.approx(total / 8, rel=1e-5)


def test_augment_is_seeded_and_keeps_images_in_range():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    a, b = (ft.augment(x, torch.Generator().manual_seed(5)) for _ in range(2))
    c = ft.augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


@pytest.mark.slow
def test_mnist_classifier_learns_and_never_sees_the_held_out_split(real_data, tmp_path, monkeypatch, capsys):
    """The command end to end on real MNIST, 80 steps. Asserted: held-out accuracy > 0.85 (chance is 0.10; a
    LeNet after 80 Adam steps of 128 images reached 0.921 here, a net wired wrongly stays near 0.1). The held-out
    split's images are read only after training returns (a spy raises before)."""
    train, test, summary = mnist(real_data)
    trained = []

    class Spy(TensorImages):
        def get(self, idx):
            assert trained, "the held-out split was read before training ended"
            return super().get(idx)

    spy = Spy(test.images, test.labels)
    monkeypatch.setattr("utils.data.registry.load_data", lambda cfg, num_workers=0: (train, spy, summary))
    real_train = features.train_feature_net

    def watched(*a, **k):
        done = real_train(*a, **k)
        trained.append(True)
        return done

    monkeypatch.setattr(features, "train_feature_net", watched)
    out = tmp_path / "mnist.safetensors"
    cli.main(["-c", str(REPO / "configs/mnist.yaml"), "--data_root", str(real_data), "--steps", "80",
             "--out", str(out)])
    assert f"wrote {out} (mnist-classifier@" in capsys.readouterr().out
    net = features.load_feature_net(out, (1, 28, 28))
    assert net.meta["config"]["kind"] == "classifier" and net.data_name == "mnist"
    assert net.meta["report"]["held_out_accuracy"] > 0.85
    e = net.embed(test.batch(torch.arange(64)))
    assert e.shape == (64, features.EMBED) and e.dtype == torch.float32
    # the features separate the classes: each held-out image's nearest neighbour shares its class far above chance
    x, y = test.batch(torch.arange(1000)), test.labels[:1000]
    d = torch.cdist(net.embed(x), net.embed(x)).fill_diagonal_(float("inf"))
    assert (y[d.argmin(1)] == y).float().mean() > 0.8


def train_bytes(split, seed, path):
    net, meta = features.train_feature_net(split, "mnist", 6, seed, log=lambda s: None)
    features.save_feature_net(net, meta, path)
    return path.read_bytes()


@pytest.mark.parametrize("labels", [True, False], ids=["classifier", "simclr"])
def test_one_seed_writes_the_same_bytes_another_seed_other_bytes(real_data, tmp_path, labels):
    """Also: the mode is the data's, not the set's name: MNIST without its labels trains SimCLR."""
    split = subset(mnist(real_data)[0], 256, labels)
    a, b, c = (train_bytes(split, s, tmp_path / f"{i}.safetensors") for i, s in enumerate((3, 3, 4)))
    assert a == b and a != c
    net = features.load_feature_net(tmp_path / "0.safetensors")
    assert net.meta["config"]["kind"] == ("classifier" if labels else "simclr")
    assert net.meta["data_fingerprint"] == ft.fingerprint(split)[0] and net.meta["fingerprint_covers"] == "pixels"


def test_the_fingerprint_follows_the_pixels(real_data):
    split = subset(mnist(real_data)[0], 100)
    changed = subset(split, 100)
    changed.images[7, 0, 3, 3] ^= 1
    assert ft.fingerprint(split) == ft.fingerprint(subset(split, 100)) != ft.fingerprint(changed)


@pytest.mark.slow
def test_simclr_on_celeba_faces_lowers_its_loss(real_data, tmp_path):
    """30 steps on real 64x64 faces: the mean NT-Xent of the last 5 steps is below that of the first 5, and the
    embedding already ties two views of one face together more often than chance (pair accuracy > 5x chance)."""
    cfg = load_config(REPO / "configs/celeba.yaml", [f"data.root={DATA / 'celeba-10k'}"]).data
    train = load_data(cfg)[0]
    assert train.labels is None
    net, meta = features.train_feature_net(train, "celeba", 30, 0, log=lambda s: None)
    rep = meta["report"]
    assert meta["config"] == {**meta["config"], "kind": "simclr", "arch": "resnet", "image_shape": [3, 64, 64]}
    assert meta["fingerprint_covers"] == "file names and sizes"
    assert rep["final_loss"] < rep["initial_loss"] - 0.05
    assert rep["pair_accuracy"] > 5 * rep["pair_chance"]
    assert rep["positive_cosine"] > rep["negative_cosine"]


def refusal(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        guarded_main(cli.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_refusals(real_data, tmp_path, capsys):
    with pytest.raises(UserError, match="no feature network at"):
        features.load_feature_net(tmp_path / "none.safetensors", (1, 28, 28))
    (tmp_path / "text.safetensors").write_text("not tensors")
    with pytest.raises(UserError, match="not a feature network of this toolkit"):
        features.load_feature_net(tmp_path / "text.safetensors")
    from utils.files import save_tensors
    save_tensors({"w": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="no 'vae-toolkit feature network 1' metadata"):
        features.load_feature_net(tmp_path / "other.safetensors")
    path = tmp_path / "net.safetensors"
    train_bytes(subset(mnist(real_data)[0], 128), 0, path)
    with pytest.raises(UserError, match="takes 1x28x28 images, not 3x64x64"):
        features.load_feature_net(path, (3, 64, 64))
    net = features.load_feature_net(path, (1, 28, 28))
    with pytest.raises(UserError, match="takes 1x28x28 images"):
        net.embed(torch.rand(2, 1, 32, 32))
    # weights altered after training no longer match the identity
    from safetensors.torch import load_file, safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["head.bias"] = state["head.bias"] + 1
    save_tensors(state, path, meta)
    with pytest.raises(UserError, match="do not match its identity"):
        features.load_feature_net(path)
    assert "--steps 0: give a positive" in refusal(capsys, ["-c", str(REPO / "configs/mnist.yaml"), "--steps", "0"])
