"""Typed, validated configuration: YAML file + command-line overrides -> ``Config``.

Why a schema of dataclasses rather than a free dict: every key a user can set is
listed once, with its type, default, allowed range and a one-line reason, so a
typo or a bad value is caught before training starts and the config reference in
docs/configuration.md is generated from the same source (``python -m utils.config``), and the registry table of
docs/models.md from REGISTRIES (``python -m utils.config registries``).
Each layer owns its section (``models/config.py``: model and loss; ``utils/data/config.py``;
``utils/training/config.py``); this module assembles them and binds each key that names a
part to its registry, whose keys are then the key's choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.config import LossConfig, ModelConfig
from utils.data.config import DataConfig
from utils.errors import UserError
from utils.fields import Registry, accepts, coerce, default_of, section_fields
from utils.training.config import TrainConfig
from utils.training.trackers import tracker_names

__all__ = ["Config", "DataConfig", "LossConfig", "ModelConfig", "TrainConfig", "build_config", "complete_config",
           "config_to_dict", "config_yaml", "load_config", "read_yaml", "reference_markdown", "registries_markdown"]

# the config keys that name a part, and the registry whose keys are their choices (one list per kind), by its
# module and name: a key's value is checked against the names before the parts' modules (and torch) load; a
# prior's, an objective's and a regulariser's registry holds their rules classes (torch-free), whose ``load()``
# gives the torch class
REGISTRIES: dict[str, Registry] = {
    "data.name": Registry("utils.data.registry", "DATASETS"),
    "model.net": Registry("models.networks", "NETWORKS"),
    "model.activation": Registry("models.layers", "ACTIVATIONS"),
    "model.likelihood": Registry("models.likelihoods", "LIKELIHOODS"),
    "model.prior": Registry("models.prior_rules", "PRIORS"),
    "loss.objective": Registry("models.objective_rules", "OBJECTIVES"),
    "loss.regulariser": Registry("models.regulariser_rules", "REGULARISERS"),
    "loss.mmd_kernel": Registry("models.regularisers", "KERNELS"),
    "loss.tc_estimator": Registry("models.total_correlation", "TC_ESTIMATORS"),
    "loss.lpips_net": Registry("models.lpips", "NETS"),
    "train.lr_schedule": Registry("utils.training.schedules", "SCHEDULES"),
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "train": TrainConfig}


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    return section_fields(SECTIONS[section])


def all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _section_fields(s)]


def _unknown(key: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "run 'python -m utils.config' to list valid keys"
    return UserError(f"unknown config key '{key}': {hint}")


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
            setattr(getattr(cfg, section), key, coerce(full, fields[key], value, REGISTRIES.get(full)))
    _check_together(cfg)
    return cfg


def _check_together(cfg: Config) -> None:
    """Keys that only make sense together. Each part states its own needs (its ``check`` and class attributes),
    so this asks the chosen parts and names none: their rules classes, which need no torch."""
    loss, train = cfg.loss, cfg.train
    objective = REGISTRIES["loss.objective"][loss.objective]
    regulariser = REGISTRIES["loss.regulariser"][loss.regulariser]
    objective.check(loss)
    if train.batch_size < regulariser.min_batch:
        raise UserError(f"loss.regulariser={loss.regulariser} estimates over the batch and needs "
                        f"train.batch_size >= {regulariser.min_batch}: raise it")
    tracker_names(train.log_with)  # an unknown tracker is an error now, not after the data loaded
    prior = REGISTRIES["model.prior"][cfg.model.prior]
    if cfg.model.conditional and not prior.conditional:
        raise UserError(f"model.conditional=true and model.prior={cfg.model.prior} do not go together (the prior "
                        f"has no class label): use model.prior=normal, or model.conditional=false")
    if objective.deterministic:
        _check_autoencoder(cfg, prior, regulariser)
    _check_layers(cfg, objective, regulariser)
    if not regulariser.accumulates and train.grad_accum_steps > 1:
        raise UserError(f"loss.regulariser={loss.regulariser} trains on each step's whole batch and does not "
                        f"accumulate: use train.grad_accum_steps=1")
    regulariser.check(loss)


def _check_layers(cfg: Config, objective: type, regulariser: type) -> None:
    """A ladder of stochastic layers (``model.latent_dims``): its sizes chain, and the parts can take it."""
    m, loss, dims = cfg.model, cfg.loss, cfg.model.latent_dims
    if loss.kl_balance and len(dims) < 2:
        raise UserError("loss.kl_balance weighs the KL of two or more stochastic layers, and this model has one: "
                        "set model.latent_dims (with a ladder model.net), or drop kl_balance")
    if loss.kl_balance and not loss.kl_warmup_steps:
        raise UserError("loss.kl_balance acts during the KL warm-up (Vahdat & Kautz 2020), and loss.kl_warmup_steps "
                        "is 0: set a warm-up, or drop kl_balance")
    if not dims:
        return
    if len(m.hidden) != len(dims) or dims[-1] != m.z_dim:
        raise UserError(f"the ladder's layers do not chain: model.latent_dims={dims} needs one width per layer in "
                        f"model.hidden (got {m.hidden}) and model.z_dim={dims[-1]}, its top layer (got {m.z_dim})")
    for key, part in (("loss.objective", objective), ("loss.regulariser", regulariser)):
        if not part.layers_ok:
            ok = [k for k, r in REGISTRIES[key].load().items() if r.layers_ok]
            raise UserError(f"{key}={getattr(loss, key.split('.')[1])} cannot take a ladder of stochastic layers "
                            f"(model.latent_dims): use {key}={' or '.join(ok)}, or drop latent_dims")
    if m.conditional:
        raise UserError("a ladder of stochastic layers (model.latent_dims) has no conditional form: set "
                        "model.conditional=false")


def _check_autoencoder(cfg: Config, prior: type, regulariser: type) -> None:
    """A deterministic autoencoder has no KL: refuse what would then train but could not be used."""
    ae = f"loss.objective={cfg.loss.objective} with loss.regulariser={cfg.loss.regulariser}"
    regularisers = REGISTRIES["loss.regulariser"].load()
    if cfg.model.conditional and not regulariser.matches_prior:
        # a conditional model draws through its prior, a class at a time; the ex-post samplers (fitted to codes)
        # fit one density to every class's codes and refuse it
        pulls = [k for k, r in regularisers.items() if r.deterministic_ok and r.matches_prior]
        raise UserError(f"model.conditional=true and {ae} do not go together: nothing pulls its codes to the "
                        f"prior, so no sampler can draw a class from it: use loss.regulariser={' or '.join(pulls)}, "
                        f"model.conditional=false, or loss.objective=elbo")
    if prior.learned and not regulariser.trains_prior:
        trains = [k for k, r in regularisers.items() if r.deterministic_ok and r.trains_prior]
        raise UserError(f"model.prior={cfg.model.prior} learns through the KL, which {ae} does not have, so its "
                        f"parameters would never train: use model.prior=normal, loss.regulariser="
                        f"{' or '.join(trains)} (whose prior draws train them), or loss.objective=elbo")


def run_warnings(cfg: Config) -> list[str]:
    """Settings that cannot take full effect in a run this long, though the run is still of use: one line each,
    for the trainer to print at start. (Settings that make a run useless are errors in ``_check_together``.)"""
    t, loss, out = cfg.train, cfg.loss, []
    if t.warmup_steps > t.steps:
        out.append(f"train.warmup_steps={t.warmup_steps} is longer than the run (train.steps={t.steps}): the learning "
                   f"rate never reaches train.lr={t.lr:g} (it peaks at {t.lr * t.steps / t.warmup_steps:.3g}); "
                   f"shorten the warm-up or raise train.steps")
    if loss.kl_warmup_steps > t.steps - 1:
        reached = (t.steps - 1) / loss.kl_warmup_steps
        out.append(f"loss.kl_warmup_steps={loss.kl_warmup_steps} is not shorter than the run (train.steps={t.steps}): "
                   f"the KL weight never reaches its full value (it ends at {100 * reached:.0f}% of it); shorten "
                   f"the warm-up or raise train.steps")
    return out


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
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} is not; a binary or damaged file?): pass a YAML "
                        f"config file") from None
    except OSError as e:
        raise UserError(f"cannot read config file '{path}' ({e.strerror}): fix its permissions or pass "
                        f"another") from None
    try:
        tree = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no tags that build objects
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


def complete_config(cfg: Config) -> Config:
    """Fill in the keys left at 0 that the chosen parts derive from the data: the regulariser's (its
    ``complete_config``: β-TCVAE's data-set size) and a conditional model's class count. Counted from the data
    set's metadata, and only when a part asks, so that --dry-run prints, and config.yaml records, the values
    training uses. A set without labels leaves ``model.n_classes`` at 0: loading then says it has none. Keys
    already set (a resumed run's config.yaml) stay as they are."""
    data = cfg.data
    counts = functools.cache(lambda: REGISTRIES["data.name"][data.name].count(data))
    REGISTRIES["loss.regulariser"][cfg.loss.regulariser].complete_config(cfg.loss, lambda: counts().train)
    if cfg.model.conditional and not cfg.model.n_classes:
        cfg.model.n_classes = counts().classes or 0
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def reference_markdown() -> str:
    """The config reference table of docs/configuration.md, generated from the schema."""
    rows = ["| key | default | accepts | what it is for |", "| --- | --- | --- | --- |"]
    for key in all_keys():
        section, name = key.split(".")
        f = _section_fields(section)[name]
        rows.append(f"| `{key}` | `{default_of(f)}` | {accepts(f, REGISTRIES.get(key))} | {f.metadata['help']} |")
    return "\n".join(rows)


def registries_markdown() -> str:
    """The registry table of docs/models.md, generated from REGISTRIES: every entry listed, so the docs cannot omit
    a new one."""
    rows = ["| config key | registry | module | entries |", "| --- | --- | --- | --- |"]
    root = Path(__file__).resolve().parent.parent
    for key, registry in REGISTRIES.items():
        entries = ", ".join(f"`{entry}`" for entry in registry)
        rows.append(f"| `{key}` | `{registry.variable}` | `{registry.file.relative_to(root).as_posix()}` | {entries} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write((registries_markdown() if sys.argv[1:] == ["registries"] else reference_markdown()) + "\n")
