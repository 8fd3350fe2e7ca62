"""Load a trained model from a run directory (config.yaml + model.safetensors), a Hub-format folder
(config.json + model.safetensors, models/pretrained.py), or a config and weights.

Weights are read with safetensors only: loading never executes code from the file.
A file that does not fit the config's model gets an error listing what differs,
not a ``load_state_dict`` dump.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from utils.config import Config, config_to_dict, load_config
from utils.errors import UserError
from utils.inference.trained import TrainedVAE
from utils.training.run_folder import newest_run


def find_run(exp_dir: str | None) -> tuple[Path, bool]:
    """(run directory, whether it was picked automatically as the newest under runs/)."""
    if exp_dir:
        run = Path(exp_dir)
        if not (run / "config.yaml").is_file() and not (run / "config.json").is_file():
            raise UserError(f"{run} is not a run directory (no config.yaml) nor a Hub-format folder (no "
                            f"config.json): pass a run under runs/ to --exp_dir")
        return run, False
    return newest_run(require="model.safetensors"), True


def tensor_mismatches(expected: dict[str, tuple], found: dict[str, tuple]) -> list[str]:
    """Each tensor name that is missing, unexpected, or of another shape (file shape vs model shape)."""
    problems = [f"{k} missing" for k in expected if k not in found]
    problems += [f"{k} unexpected" for k in found if k not in expected]
    problems += [f"{k} {found[k]} vs {v}" for k, v in expected.items() if k in found and found[k] != v]
    return problems


def load_model(cfg: Config, weights: Path, device: torch.device | str = "cpu") -> TrainedVAE:
    """Build the config's VAE and fill it from a safetensors file, checking every tensor first."""
    if not weights.is_file():
        raise UserError(f"weights '{weights}' not found: train first (python train_vae.py -c CONFIG) "
                        f"or pass an existing model.safetensors with --weights")
    return fill_checked(TrainedVAE(config_to_dict(cfg)), weights).to(device)


def fill_checked(model: TrainedVAE, weights: Path) -> TrainedVAE:
    """Fill ``model`` from a safetensors file after checking every tensor's name and shape; eval mode."""
    if weights.suffix != ".safetensors":
        raise UserError(f"weights '{weights}' are not a .safetensors file: only safetensors are loaded "
                        f"(no pickles); use the run's model.safetensors")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"weights '{weights}' cannot be read as safetensors ({e}): the file is damaged or "
                        f"not safetensors") from None
    cfg = model.config
    problems = tensor_mismatches({k: tuple(v.shape) for k, v in model.state_dict().items()},
                                 {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise UserError(f"weights '{weights}' do not fit the config's model (z_dim={cfg.model.z_dim}, "
                        f"net={cfg.model.net}, likelihood={cfg.model.likelihood}): {shown}; "
                        f"pass the config the weights were trained with")
    model.load_state_dict(state)
    return model.eval()


def load_run(exp_dir: str | None, config: str | None, weights: str | None,
             device: torch.device | str = "cpu", data_root: str | None = None) -> tuple[Config, TrainedVAE, Path, bool]:
    """(config, model, run directory, auto-picked) from --exp_dir, or -c with --weights. ``data_root`` replaces the
    config's data.root: a run evaluated on another machine than it was trained on finds its data there."""
    cfg, model, run, auto = _load_run(exp_dir, config, weights, device)
    if data_root:
        cfg.data.root = data_root
    return cfg, model, run, auto


def _load_run(exp_dir: str | None, config: str | None, weights: str | None,
              device: torch.device | str) -> tuple[Config, TrainedVAE, Path, bool]:
    if config or weights:
        if not (config and weights):
            raise UserError("-c and --weights go together: pass both, or pass a run with --exp_dir")
        cfg = load_config(config)
        w = Path(weights)
        return cfg, load_model(cfg, w, device), w.parent, False
    run, auto = find_run(exp_dir)
    if not (run / "config.yaml").is_file():  # a Hub-format folder
        model = TrainedVAE.load(run, device)
        return model.config, model, run, auto
    cfg = load_config(run / "config.yaml")
    return cfg, load_model(cfg, run / "model.safetensors", device), run, auto
