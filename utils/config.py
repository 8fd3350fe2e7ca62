"""Typed, validated configuration: YAML file + command-line overrides -> ``Config``.

Why a schema of dataclasses rather than a free dict: every key a user can set is
listed once, with its type, default, allowed range and a one-line reason, so a
typo or a bad value is caught before training starts and the README's config
reference is generated from the same source (``python -m utils.config``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.likelihoods import LIKELIHOODS
from models.networks import ACTIVATIONS, NETWORKS
from models.objectives import OBJECTIVES
from models.priors import PRIORS
from models.regularisers import KERNELS, REGULARISERS, TC_ESTIMATORS
from utils.data.sources import DATASETS
from utils.errors import UserError
from utils.training.schedules import SCHEDULES
from utils.training.trackers import tracker_names

# the config keys that name a part, and the registry whose keys are their choices (one list per kind)
REGISTRIES: dict[str, dict] = {
    "data.name": DATASETS,
    "model.net": NETWORKS,
    "model.activation": ACTIVATIONS,
    "model.likelihood": LIKELIHOODS,
    "model.prior": PRIORS,
    "loss.objective": OBJECTIVES,
    "loss.regulariser": REGULARISERS,
    "loss.mmd_kernel": KERNELS,
    "train.lr_schedule": SCHEDULES,
}


def opt(default: Any, help: str, *, choices: tuple | dict | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False) -> Any:
    """A config field with its documentation and the values it accepts. ``choices`` may be a registry (a dict):
    its keys are then read whenever a value is checked, so an entry added to it is at once valid."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = opt("mnist", "data set", choices=DATASETS)
    root: str = opt("data", "folder holding the data set (see the data table in the README)")
    download: bool = opt(True, "download MNIST / Fashion-MNIST / CIFAR-10 when missing (needs internet)")
    img_size: int = opt(0, "image size after loading; 0: the set's own (28 MNIST, 32 CIFAR-10, 64 others)",
                        min=0, max=512)
    channels: int = opt(0, "0: the set's own; image_folder and hf convert to 1 (grey) or 3 (RGB)", choices=(0, 1, 3))
    hflip: bool = opt(False, "random horizontal flips of training batches (CelebA, CIFAR-10)")
    cache: bool = opt(False, "image files: decode and resize once into data.cache_dir; later epochs read no file")
    cache_dir: str = opt("cache", "where decoded caches (and dSprites' extracted array) are written")
    num_workers: int = opt(4, "DataLoader workers decoding image files (0: in the main process)", min=0)
    test_fraction: float = opt(0.05, "held-out fraction for sets without an official test split", min=0.0,
                               max=0.5, min_exclusive=True)
    split_seed: int = opt(0, "seed of that held-out split (fixed: evaluation always sees the same images)", min=0)
    labels: bool = opt(True, "image_folder: class labels from sub-folder names")
    binarize: bool = opt(False, "train on stochastically binarised images (binarised MNIST, with bernoulli)")
    hf_image_column: str = opt("image", "hf: the column holding the images")
    hf_label_column: str = opt("label", "hf: class labels from this column when it exists ('' for none)")
    hf_train_split: str = opt("train", "hf: the split to train on")
    hf_test_split: str = opt("test", "hf: the held-out split ('' holds out a seeded data.test_fraction of the "
                                     "training split)")


@dataclass
class ModelConfig:
    net: str = opt("mlp", "encoder/decoder network", choices=NETWORKS)
    z_dim: int = opt(16, "size of the latent code z", min=1, max=4096)
    likelihood: str = opt("bernoulli", "decoder likelihood p(x|z)", choices=LIKELIHOODS)
    sigma: float = opt(1.0, "fixed decoder std for likelihood=gaussian", min=0.0, min_exclusive=True)
    prior: str = opt("normal", "prior p(z): normal is N(0, I), vamp the VampPrior (Tomczak & Welling 2018)",
                     choices=PRIORS)
    vamp_components: int = opt(500, "prior=vamp: pseudo-inputs K (the paper's 500 for MNIST)", min=1)
    hidden: list[int] = opt([400], "mlp: units of each hidden layer, encoder order (the classic 784-400-z); "
                                   "the decoder mirrors them")
    activation: str = opt("relu", "mlp, resconv: activation between layers", choices=ACTIVATIONS)
    base_width: int = opt(32, "conv, resconv: channels of the first conv layer", min=1)
    channel_mults: list[int] = opt([1, 2, 4], "conv, resconv: width multipliers, one per 4x4 stride-2 layer")
    res_blocks: int = opt(1, "resconv: residual blocks at each resolution", min=0, max=64)
    conditional: bool = opt(False, "a conditional VAE (Sohn et al. 2015): encoder and decoder also see the image's "
                                   "class label, one-hot; needs a data set with labels")
    n_classes: int = opt(0, "conditional: number of classes (0: from the data set's labels, written into the run's "
                            "config.yaml)", min=0)


@dataclass
class LossConfig:
    objective: str = opt("elbo", "elbo (one reparameterised sample per image) or iwae (importance-weighted "
                                 "bound with loss.k samples)", choices=OBJECTIVES)
    k: int = opt(1, "objective=iwae: importance samples per image (Burda et al. 2016: 5 or 50)", min=1, max=5000)
    regulariser: str = opt("kl", "latent term: kl (beta * KL), mmd (beta * KL + mmd_weight * MMD, InfoVAE), tcvae "
                                 "(KL + (beta - 1) * total correlation), factorvae (beta * KL + factor_gamma * "
                                 "critic's TC), dip_i or dip_ii (beta * KL + DIP penalty)",
                           choices=REGULARISERS)
    beta: float = opt(1.0, "weight of KL(q(z|x) || p(z)); beta != 1 is a beta-VAE", min=0.0)
    kl_warmup_steps: int = opt(0, "linear KL warm-up from 0 to beta over this many steps (0: off)", min=0)
    mmd_weight: float = opt(0.0, "regulariser=mmd: weight of MMD(q(z) || p(z)), > 0", min=0.0)
    mmd_kernel: str = opt("imq", "regulariser=mmd: inverse multiquadric or RBF kernel", choices=KERNELS)
    tc_estimator: str = opt("mss", "regulariser=tcvae: minibatch-stratified or minibatch-weighted sampling "
                                   "(Chen et al. 2018)", choices=TC_ESTIMATORS)
    tc_dataset_size: int = opt(0, "regulariser=tcvae: training images N in the estimator (0: the training set's "
                                  "size, written into the run's config.yaml)", min=0)
    factor_gamma: float = opt(10.0, "regulariser=factorvae: weight of the critic's total correlation estimate "
                                    "(disentanglement_lib sweeps 10-100)", min=0.0)
    factor_critic_hidden: list[int] = opt([1000] * 6, "regulariser=factorvae: the critic's hidden layers (the "
                                                      "paper's 6 x 1000)")
    factor_critic_lr: float = opt(1e-4, "regulariser=factorvae: the critic's Adam learning rate (the paper's)",
                                  min=0.0, min_exclusive=True)
    dip_lambda_od: float = opt(10.0, "regulariser=dip_i, dip_ii: weight of the off-diagonal covariance penalty",
                               min=0.0)
    dip_lambda_d: float = opt(100.0, "regulariser=dip_i, dip_ii: weight of the diagonal penalty (Kumar et al.: "
                                     "10 x dip_lambda_od for dip_i, 1 x for dip_ii)", min=0.0)


@dataclass
class TrainConfig:
    steps: int = opt(5000, "optimizer steps in total", min=1)
    batch_size: int = opt(128, "global batch size, split evenly across processes", min=1)
    grad_accum_steps: int = opt(1, "micro-batches per step: each process's share of the batch is split into this "
                                   "many, run in turn, their gradients averaged (the same batch on fewer devices)",
                                min=1)
    lr: float = opt(1e-3, "Adam learning rate (the peak, with a schedule)", min=0.0, min_exclusive=True)
    lr_schedule: str = opt("constant", "learning-rate schedule after warm-up", choices=SCHEDULES)
    warmup_steps: int = opt(0, "linear learning-rate warm-up from 0 over this many steps (0: off)", min=0)
    lr_min_ratio: float = opt(0.0, "cosine: the final learning rate as a fraction of train.lr", min=0.0, max=1.0)
    lr_decay: float = opt(0.1, "exponential, step: factor per train.lr_decay_steps", min=0.0, max=1.0,
                          min_exclusive=True)
    lr_decay_steps: int = opt(1000, "exponential, step: steps per factor of train.lr_decay", min=1)
    weight_decay: float = opt(0.0, "Adam weight decay", min=0.0)
    ema_decay: float = opt(0.0, "exponential moving average of the weights with this decay per step (0: off; "
                                "0.999 is common): the test ELBO, grids and model.safetensors use the average",
                           min=0.0, max=0.999999)
    grad_clip: float = opt(0.0, "clip the global gradient norm to this value (0: off)", min=0.0)
    seed: int = opt(0, "seed for initialisation, noise and data order", min=0)
    mixed_precision: str = opt("launcher", "no, fp16, bf16, or launcher: take accelerate's setting",
                               choices=("launcher", "no", "fp16", "bf16"))
    log_every: int = opt(50, "steps between progress-bar / metrics.jsonl updates", min=1)
    log_with: str = opt("tensorboard", "experiment trackers, comma-separated: any of Accelerate's (tensorboard, "
                                       "wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio), or none")
    sample_every: int = opt(1000, "steps between sample and reconstruction grids (0: only at the end)", min=0)
    eval_every: int = opt(1000, "steps between test-split ELBO evaluations (0: only at the end)", min=0)
    eval_samples: int = opt(0, "test images used by the periodic evaluation (0: all)", min=0)
    save_every: int = opt(1000, "steps between resumable checkpoints (0: only at the end)", min=0)
    keep_checkpoints: int = opt(3, "newest checkpoints kept; older ones are deleted (0: keep all)", min=0)
    max_bad_steps: int = opt(20, "stop after this many non-finite (NaN/Inf) steps in a row; each is skipped",
                             min=1)
    channels_last: bool = opt(True, "conv nets: channels-last memory format (faster convolutions on CPU and GPU)")
    compile: bool = opt(False, "torch.compile the model (slow first steps, then faster on GPUs)")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig}[section]
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s in ("data", "model", "loss", "train") for k in _section_fields(s)]


def _unknown(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "run 'python -m utils.config' to list valid keys"
    return UserError(f"unknown config key '{key}': {hint}")


def _accepts(f: dataclasses.Field) -> str:
    m = f.metadata
    if m["choices"]:
        return "one of " + ", ".join(map(str, m["choices"]))
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        f.type, "a list of integers")
    if m["min"] is not None:
        kind += f" {'>' if m['min_exclusive'] else '>='} {m['min']:g}"
    if m["max"] is not None:
        kind += f" and <= {m['max']:g}"
    return kind


def _coerce(key: str, f: dataclasses.Field, value: Any) -> Any:
    """Check one value against its field; return it in the field's type."""
    bad = UserError(f"{key}: got {value!r}, expected {_accepts(f)}")
    t = f.type
    if t is bool:
        if not isinstance(value, bool):
            raise bad
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
    elif t is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string: YAML 1.1
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise UserError(f"{key}: got {value}, expected a finite number ({_accepts(f)})")
        value = float(value)
    elif t is str:
        if value is False and "no" in f.metadata["choices"]:
            value = "no"  # YAML 1.1 reads a bare no (train.mixed_precision=no, Accelerate's word) as false
        if not isinstance(value, str):
            raise bad
    else:  # list[int]; a single integer is a list of one (model.hidden: 400, as configs wrote it before lists)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise UserError(f"{key}: got {value!r}, expected a non-empty list of positive integers")
        return list(value)
    m = f.metadata
    if m["choices"] and value not in m["choices"]:
        raise bad
    if m["min"] is not None and (value < m["min"] or (m["min_exclusive"] and value == m["min"])):
        raise bad
    if m["max"] is not None and value > m["max"]:
        raise bad
    return value


def build_config(tree: dict[str, Any]) -> Config:
    """Validate a nested dict (from YAML and overrides) into a ``Config``."""
    if not isinstance(tree, dict):
        raise UserError("config must be a mapping of sections (data, model, loss, train)")
    cfg = Config()
    for section, values in tree.items():
        if section not in SECTIONS:
            raise _unknown(str(section))
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"config section '{section}' must be a mapping of keys, got {values!r}")
        fields = _section_fields(section)
        for key, value in values.items():
            full = f"{section}.{key}"
            if key not in fields:
                raise _unknown(full)
            setattr(getattr(cfg, section), key, _coerce(full, fields[key], value))
    _check_together(cfg)
    return cfg


def _check_together(cfg: Config) -> None:
    """Keys that only make sense together: a weight for a term that the chosen regulariser does not have."""
    loss = cfg.loss
    if loss.objective == "iwae" and loss.regulariser != "kl":
        raise UserError(f"loss.objective=iwae weights samples by p(x|z)p(z)/q(z|x) and has no place for "
                        f"loss.regulariser={loss.regulariser}: use loss.regulariser=kl or loss.objective=elbo")
    if loss.objective != "iwae" and loss.k > 1:
        raise UserError(f"loss.k={loss.k} is used only by loss.objective=iwae: set loss.objective=iwae, or drop k")
    if loss.regulariser in ("tcvae", "factorvae", "dip_i", "dip_ii") and cfg.train.batch_size < 2:
        raise UserError(f"loss.regulariser={loss.regulariser} estimates over the batch and needs "
                        f"train.batch_size >= 2: raise it")
    tracker_names(cfg.train.log_with)  # an unknown tracker is an error now, not after the data loaded
    if cfg.model.conditional and cfg.model.prior == "vamp":
        raise UserError("model.conditional=true and model.prior=vamp do not go together (the pseudo-inputs have no "
                        "class label): use model.prior=normal, or model.conditional=false")
    if loss.regulariser == "factorvae" and cfg.train.grad_accum_steps > 1:
        raise UserError("loss.regulariser=factorvae trains its critic on each step's whole batch of codes and does not "
                        "accumulate: use train.grad_accum_steps=1")
    if loss.regulariser == "mmd" and loss.mmd_weight == 0:
        raise UserError("loss.regulariser=mmd needs loss.mmd_weight > 0 (100 suits MNIST): set it, or use "
                        "loss.regulariser=kl")
    if loss.regulariser != "mmd" and loss.mmd_weight > 0:
        raise UserError(f"loss.mmd_weight={loss.mmd_weight:g} has no effect with loss.regulariser="
                        f"{loss.regulariser}: set loss.regulariser=mmd, or drop mmd_weight")


def parse_overrides(tokens: list[str]) -> list[tuple[str, Any]]:
    """``['loss.beta=4', '--train.lr', '3e-4']`` -> ``[('loss.beta', 4), ('train.lr', 3e-4)]``.

    Values are parsed as YAML, so numbers, booleans and lists need no quoting rules.
    """
    out, i = [], 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.startswith("--"):
            tok = tok[2:]
            if "=" not in tok:
                if i + 1 >= len(tokens):
                    raise UserError(f"override --{tok} has no value: write --{tok} VALUE or {tok}=VALUE")
                tok = f"{tok}={tokens[i + 1]}"
                i += 1
        if "=" not in tok or "." not in tok.split("=", 1)[0]:
            raise UserError(f"cannot read argument '{tokens[i]}': overrides look like loss.beta=4 or --loss.beta 4")
        key, raw = tok.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
        i += 1
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys and drops the first silently; here that is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:  # an unhashable key: the base class reports it
                break
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' not found: pass an existing YAML file, e.g. -c configs/mnist.yaml")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader: no tags that build objects
    except _DuplicateKey as e:
        raise UserError(f"{path}: key '{e.key}' appears twice, at lines {e.first} and {e.second} (YAML would "
                        f"silently keep only the second): merge them into one") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: malformed YAML{where} ({problem}): fix the file") from None
    return tree or {}


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply overrides, validate."""
    tree = read_yaml(path) if path is not None else {}
    if not isinstance(tree, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (data, model, loss, train)")
    for key, value in parse_overrides(overrides or []):
        section, _, name = key.partition(".")
        if section not in SECTIONS or name not in _section_fields(section):
            raise _unknown(key)
        node = tree.setdefault(section, {})
        if node is None:
            node = tree[section] = {}
        if not isinstance(node, dict):
            raise UserError(f"config section '{section}' must be a mapping of keys, got {node!r}")
        node[name] = value
    return build_config(tree)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def reference_markdown() -> str:
    """The README's config reference table, generated from the schema."""
    rows = ["| key | default | accepts | what it is for |", "| --- | --- | --- | --- |"]
    for key in all_keys():
        section, name = key.split(".")
        f = _section_fields(section)[name]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append(f"| `{key}` | `{default}` | {_accepts(f)} | {f.metadata['help']} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown() + "\n")
