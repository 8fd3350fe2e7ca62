"""What sample.py and evaluate.py load from their arguments: a run folder (config.yaml + model.safetensors),
a Hub-format folder (config.json + model.safetensors), a config with its weights, or the newest run.

Weights are read with safetensors only (utils/inference/trained.py): loading never executes
code from the file, and a file that does not fit the config's model gets an error listing
what differs, not a ``load_state_dict`` dump.
"""

from __future__ import annotations

from pathlib import Path

import torch

from utils.config import Config, load_config
from utils.errors import UserError
from utils.inference.trained import TrainedVAE, load_model
from utils.training.run_folder import newest_run_folder


def find_model_folder(exp_dir: str | None) -> tuple[Path, bool]:
    """(run directory, whether it was picked automatically as the newest under runs/)."""
    if exp_dir:
        run = Path(exp_dir)
        if not (run / "config.yaml").is_file() and not (run / "config.json").is_file():
            raise UserError(f"{run} is not a run directory (no config.yaml) nor a Hub-format folder (no "
                            f"config.json): pass a run under runs/ to --exp_dir")
        return run, False
    return newest_run_folder(require="model.safetensors"), True


def load_trained(exp_dir: str | None, config: str | None, weights: str | None,
             device: torch.device | str = "cpu", data_root: str | None = None) -> tuple[Config, TrainedVAE, Path, bool]:
    """(config, model, run directory, auto-picked) from --exp_dir, or -c with --weights. ``data_root`` replaces the
    config's data.root: a run evaluated on another machine than it was trained on finds its data there."""
    cfg, model, run, auto = _load_trained(exp_dir, config, weights, device)
    if data_root:
        cfg.data.root = data_root
    return cfg, model, run, auto


def _load_trained(exp_dir: str | None, config: str | None, weights: str | None,
              device: torch.device | str) -> tuple[Config, TrainedVAE, Path, bool]:
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
