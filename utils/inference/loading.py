"""What sample.py and evaluate.py load from their arguments: a run folder (config.yaml + model.safetensors),
a Hub-format folder (config.json + model.safetensors), a config with its weights, or the newest run.

Weights are read with safetensors only (utils/inference/trained.py): loading never executes
code from the file, and a file that does not fit the config's model gets an error listing
what differs, not a ``load_state_dict`` dump.

Importing this module loads no torch: the CLIs add its flags and refuse bad ones first, and load the model after.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from models.sampler_rules import SAMPLERS, SamplerOptions, declared_options, fitted_names
from utils.errors import UserError

if TYPE_CHECKING:
    import torch

    from utils.config import Config
    from utils.inference.trained import TrainedVAE

# The data layer's advice names the config keys a training run takes; sample.py and evaluate.py take no config
# overrides, only --data_root (and the run's data.download as it was trained): their errors name the flag instead.
_CONFIG_TERMS = ((re.compile(r"point data\.root at"), "pass --data_root"),
                 (re.compile(r"data\.root=(\S+)"), r"--data_root \1"),
                 (re.compile(r"\bdata\.root\b"), "--data_root"),
                 (re.compile(r", or set data\.download=true \(needs internet\)"), ""))


def in_cli_terms(message: str) -> str:
    """``message`` with the data settings it names as the flags of sample.py and evaluate.py."""
    for pattern, replacement in _CONFIG_TERMS:
        message = pattern.sub(replacement, message)
    return message


def speaks_cli_terms(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """Wrap a CLI's ``main`` so that a ``UserError`` from the data layer advises a flag the CLI takes: a hint to
    set ``data.root`` would be refused there as an unknown argument."""
    @functools.wraps(main)
    def wrapped(argv: list[str]) -> None:
        try:
            main(argv)
        except UserError as e:
            raise UserError(in_cli_terms(str(e))) from e.__cause__
    return wrapped


def find_model_folder(exp_dir: str | None) -> tuple[Path, bool]:
    """(run directory, whether it was picked automatically as the newest under runs/)."""
    if exp_dir:
        run = Path(exp_dir)
        if not (run / "config.yaml").is_file() and not (run / "config.json").is_file():
            raise UserError(f"{run} is not a run directory (no config.yaml) nor a Hub-format folder (no "
                            f"config.json): pass a run under runs/ to --exp_dir")
        return run, False
    from utils.training.run_folder import newest_run_folder

    return newest_run_folder(require="model.safetensors"), True


def load_trained(exp_dir: str | None, config: str | None, weights: str | None,
             device: torch.device | str = "cpu", data_root: str | None = None) -> tuple[Config, TrainedVAE, Path, bool]:
    """(config, model, run directory, auto-picked) from --exp_dir, or -c with --weights. ``data_root`` replaces the
    config's data.root: a run evaluated on another machine than it was trained on finds its data there."""
    cfg, model, run, auto = _load_trained(exp_dir, config, weights, device)
    if data_root:  # the model's own copy too: a sampler fitted later reads the training set through it
        cfg.data.root = model.config.data.root = data_root
    return cfg, model, run, auto


def _load_trained(exp_dir: str | None, config: str | None, weights: str | None,
              device: torch.device | str) -> tuple[Config, TrainedVAE, Path, bool]:
    from utils.config import load_config
    from utils.inference.trained import TrainedVAE, load_model

    if config or weights:
        if not (config and weights):
            raise UserError("-c and --weights go together: pass both, or pass a run with --exp_dir")
        cfg = load_config(config)
        w = Path(weights)
        return cfg, load_model(cfg, w, device), w.parent, False
    run, auto = find_model_folder(exp_dir)
    if not (run / "config.yaml").is_file():  # a Hub-format folder
        model = TrainedVAE.load(run, device)
        return model.config, model, run, auto
    cfg = load_config(run / "config.yaml")
    return cfg, load_model(cfg, run / "model.safetensors", device), run, auto


def output_folder(model_folder: Path, name: str) -> Path:
    """Where sample.py and evaluate.py write by default: inside a run folder (``<run>/<name>``), but beside a
    Hub-format folder (``<folder>-<name>``), whose files a later upload would otherwise publish."""
    if (model_folder / "config.yaml").is_file() or not (model_folder / "config.json").is_file():
        return model_folder / name
    return model_folder.parent / f"{model_folder.name}-{name}"


def add_sampler_arguments(p: argparse.ArgumentParser) -> None:
    """sample.py's and evaluate.py's choice of ex-post sampler and the flags of its fit options, as each sampler
    declares them (models/sampler_rules.py); None when not given, so that a flag the command would ignore can be
    refused: ``sampler_options``."""
    fitted = fitted_names()
    p.add_argument("--sampler", help=f"where codes are drawn from: {', '.join(SAMPLERS)} (default prior; "
                                     f"{', '.join(fitted[:-1])} and {fitted[-1]} are fitted to the training codes "
                                     f"once, and kept in the model's folder)")
    p.add_argument("--refit", action="store_true", help="fit the sampler again, replacing the kept one")
    for o in declared_options().values():
        if o.flag:
            o.add_to(p, default=None)


def sampler_options(args: argparse.Namespace, uses: list[str], does: str) -> SamplerOptions:
    """The fit options of sample.py's and evaluate.py's arguments, checked by ``SamplerOptions`` itself (one home
    for the rules), after refusing each sampler flag that would have no effect: ``uses`` are the samplers the
    command draws from or fits (empty: none), ``does`` says what it does, for the refusal's line. Torch is not
    loaded: every refusal here is said at once."""
    for name in uses:
        if name not in SAMPLERS:
            raise UserError(f"unknown --sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    check_sampler_values(args)
    flags = [o.name for o in declared_options().values() if o.flag]
    given = {k: getattr(args, k) for k in flags if getattr(args, k) is not None}
    for k in given:
        owners = [n for n in SAMPLERS if any(o.name == k for o in SAMPLERS[n].every_option())]
        if not set(owners) & set(uses):
            raise UserError(f"--{k} is an option of --sampler {' and '.join(owners)}, and {does}: drop it")
    if args.refit and not any(SAMPLERS[n].fitted for n in uses):
        raise UserError(f"--refit fits a sampler again ({' or '.join(fitted_names())}), and {does}: drop it")
    return SamplerOptions(**given)


def check_sampler_values(args: argparse.Namespace) -> None:
    """Refuse a bad value of a sampler flag (``--gmm_components 0``) in one line, before the model loads."""
    for o in declared_options().values():
        if o.flag and getattr(args, o.name) is not None:
            o.check(getattr(args, o.name))
