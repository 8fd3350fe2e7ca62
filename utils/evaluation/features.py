"""A feature network of the toolkit's own: the feature space of the sample-quality metrics, trained offline.

Inception weights for FID cannot be downloaded here, and a score in the VAE's own latent space judges a model
by itself. So the toolkit trains, per data set and on its training split only, a small network whose
penultimate layer (``EMBED`` dimensions) is the feature: a classifier where the split has labels (a LeNet-class
net for images under 32 px, a small ResNet-class net from 32 px), a SimCLR encoder where it has none
(utils/evaluation/feature_training.py). It is kept as safetensors with its config, the data set's name, a
fingerprint of the images it saw and an identity ``name@hash12`` (of the weights): numbers measured in two
different feature spaces are not comparable, and the identity says which one a number belongs to.

Trained by ``python -m utils.inference.features -c CONFIG`` (the command reads a config, a layer above this one).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from utils.errors import UserError

FORMAT = "vae-toolkit feature network 1"
EMBED = 128
WIDTH = 16
DEFAULT_STEPS = {"classifier": 1000, "simclr": 300}
BATCH = {"classifier": 128, "simclr": 64}


class Residual(nn.Module):
    """A ResNet basic block (He et al. 2016): two 3x3 convolutions with batch norm, and a 1x1 projection of
    the shortcut where the stride or width changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                               nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x) + self.skip(x))


class FeatureCNN(nn.Module):
    """body: images in [0, 1] -> the ``embed``-d feature; head: a class layer (classifier) or SimCLR's
    two-layer projection (simclr), used in training only. ``arch`` lenet: two 5x5 convolutions with pooling and
    a fully connected layer (LeCun et al. 1998, with ReLU); resnet: a 3x3 stem and three residual stages
    (stride 2 from 64 px so a CPU can train it), global average pooling, a fully connected layer."""

    def __init__(self, arch: str, shape: tuple[int, int, int], width: int, embed: int, kind: str, classes: int):
        super().__init__()
        c, h, w = shape
        if arch == "lenet":
            self.body = nn.Sequential(
                nn.Conv2d(c, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), embed), nn.ReLU())
        else:
            stem_stride = 2 if min(h, w) >= 64 else 1
            self.body = nn.Sequential(
                nn.Conv2d(c, width, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                Residual(width, width, 1), Residual(width, 2 * width, 2), Residual(2 * width, 4 * width, 2),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, embed), nn.ReLU())
        self.head = (nn.Linear(embed, classes) if kind == "classifier" else
                     nn.Sequential(nn.Linear(embed, embed), nn.ReLU(), nn.Linear(embed, embed)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.body(x * 2 - 1)
        return e, self.head(e)


def architecture(shape: tuple[int, int, int]) -> str:
    """LeNet-class under 32 px (MNIST's 28), ResNet-class from 32 px (CIFAR-10, CelebA 64)."""
    return "lenet" if min(shape[1:]) < 32 else "resnet"


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 of the weights (names, shapes, dtypes and bytes, in name order): the network's identity."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FeatureNet:
    """A trained feature network: ``embed(images)`` -> (N, d) features; ``identity`` names it in every
    number measured in its space."""

    def __init__(self, net: FeatureCNN, meta: dict):
        self.net, self.meta = net.eval(), meta
        self.identity: str = meta["identity"]
        self.data_name: str = meta["data_name"]
        self.image_shape: tuple[int, int, int] = tuple(meta["config"]["image_shape"])
        self.dim: int = meta["config"]["embed"]

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Features of ``images`` in [0, 1], (N, C, H, W) at the network's image shape, as float32 (N, d)."""
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise UserError(f"images of shape {tuple(images.shape[1:])} given to the feature network {self.identity}, "
                            f"which takes {'x'.join(map(str, self.image_shape))} images: use the feature network "
                            f"of this data set at this image size")
        self.net.eval()
        out = [self.net.body(images[i:i + batch_size].float().cpu() * 2 - 1) for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.empty(0, self.dim)


def save_feature_net(net: FeatureCNN, meta: dict, path: Path) -> str:
    """Write ``net`` and ``meta`` (its config, data set, fingerprint, reports) to ``path``; return its
    identity. The metadata holds no time or path, so one seed writes the same bytes."""
    from utils.files import save_tensors

    state = net.state_dict()
    meta = dict(meta, identity=f"{meta['data_name']}-{meta['config']['kind']}@{weights_hash(state)[:12]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes several in hash-map order, which differs from run to run
    save_tensors(state, path, {"feature_network": json.dumps(meta, sort_keys=True)})
    return meta["identity"]


def load_feature_net(path: str | Path, expected_shape: tuple[int, int, int] | None = None) -> FeatureNet:
    """The feature network at ``path``; a one-line UserError for a missing file, a file that is not a feature
    network of this toolkit (or whose weights no longer match its identity), or an image shape other than
    ``expected_shape``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    train = f"train one with python -m utils.inference.features -c CONFIG --out {path}"
    if not path.is_file():
        raise UserError(f"no feature network at {path}: {train}")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        state = load_file(str(path))
        meta = json.loads(header.get("feature_network", "{}"))
        meta = meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None
        cfg = meta["config"] if meta else None
        net = FeatureCNN(cfg["arch"], tuple(cfg["image_shape"]), cfg["width"], cfg["embed"], cfg["kind"],
                         cfg.get("classes", 0)) if cfg else None
        if net is not None:
            net.load_state_dict(state)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"{path} is not a feature network of this toolkit ({str(e).splitlines()[0][:100]}): "
                        f"{train}") from None
    if meta is None:
        raise UserError(f"{path} is not a feature network of this toolkit (no '{FORMAT}' metadata): {train}")
    if not meta.get("identity", "").endswith("@" + weights_hash(state)[:12]):
        raise UserError(f"{path}: its weights do not match its identity {meta.get('identity')!r} (altered after "
                        f"training?): {train}")
    fnet = FeatureNet(net, meta)
    if expected_shape is not None and tuple(expected_shape) != fnet.image_shape:
        shape = "x".join(map(str, fnet.image_shape))
        raise UserError(f"the feature network {path} ({fnet.identity}) takes {shape} images, not "
                        f"{'x'.join(map(str, expected_shape))}: train one at this size with python -m "
                        f"utils.inference.features -c CONFIG --out OTHER_FILE")
    return fnet


def train_feature_net(train, data_name: str, steps: int | None, seed: int, log=print) -> tuple[FeatureCNN, dict]:
    """Train on the training split ``train`` alone: (network, metadata without identity)."""
    from utils.evaluation import feature_training as ft

    kind = "classifier" if ft.labelled(train) else "simclr"
    steps = DEFAULT_STEPS[kind] if steps is None else steps
    shape = tuple(train.shape)
    classes = int(train.labels.max()) + 1 if kind == "classifier" else 0
    batch = min(BATCH[kind], len(train))
    cfg = {"kind": kind, "arch": architecture(shape), "width": WIDTH, "embed": EMBED, "steps": steps, "seed": seed,
           "batch_size": batch, "image_shape": list(shape), "classes": classes}
    digest, covers = ft.fingerprint(train)
    log(f"training a {cfg['arch']} {kind} ({EMBED}-d features) on {len(train)} {data_name} training images, "
        f"{steps} steps, seed {seed}")
    with ft.reproducible(seed):
        net = FeatureCNN(cfg["arch"], shape, WIDTH, EMBED, kind, classes)
        fit = ft.train_classifier if kind == "classifier" else ft.train_simclr
        done = fit(net, train, steps, batch, seed, log=log)
    meta = {"format": FORMAT, "config": cfg, "data_name": data_name, "train_images": len(train),
            "data_fingerprint": digest, "fingerprint_covers": covers, "report": done.report}
    return done.net, meta
