"""Experiment trackers: any that Accelerate supports, chosen by ``train.log_with``.

Accelerate owns the trackers (``Accelerator(log_with=...)``, ``accelerator.log``);
this module names them, checks that their packages are installed before a run
starts, gives them the config as hyperparameters, and sends them the sample and
reconstruction grids, which Accelerate has no common call for: TensorBoard and
Weights & Biases take images, MLflow and the others the PNG files as artifacts.
Where a tracker stores its runs is its own setting (``MLFLOW_TRACKING_URI``,
``WANDB_MODE``, ...); TensorBoard writes into the run directory's ``tb/``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from utils.errors import UserError

if TYPE_CHECKING:  # (the config checks tracker names without loading accelerate)
    from accelerate import Accelerator

# Accelerate's tracker names and the package each needs
PACKAGES: dict[str, str] = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}
_MODULES = {"tensorboard": "torch.utils.tensorboard", "comet_ml": "comet_ml"}


def tracker_names(spec: str) -> list[str]:
    """``"tensorboard,mlflow"`` -> ``["tensorboard", "mlflow"]``; ``"none"`` -> ``[]``. Unknown names are an error."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["none"]:
        return []
    for n in names:
        if n not in PACKAGES:
            raise UserError(f"train.log_with: unknown tracker '{n}': use none or a comma-separated list of "
                            f"{', '.join(PACKAGES)}")
    return list(dict.fromkeys(names))


def check_installed(names: list[str]) -> None:
    """A one-line error naming the package of a chosen tracker that is not installed (Accelerate would only warn
    and train without it)."""
    for n in names:
        module = _MODULES.get(n, n)
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise UserError(f"train.log_with={n} needs the {PACKAGES[n]} package, which is not installed: "
                            f"pip install {PACKAGES[n]}, or drop {n} from train.log_with")


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The nested config as flat ``section.key`` hyperparameters of the types every tracker takes (lists as text)."""
    flat = {}
    for section, values in config.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def start_trackers(accelerator: Accelerator, log_with: str, config: dict[str, Any], run_dir: Path,
                   fresh: bool) -> None:
    """Start the trackers with the config as hyperparameters. One that cannot start (a bad tracking URI, no
    login) is a one-line error, and a run directory made for this start (``fresh``) is removed again."""
    try:
        accelerator.init_trackers("vae-toolkit", config=hyperparameters(config),
                                  init_kwargs={"mlflow": {"run_name": run_dir.name}, "wandb": {"name": run_dir.name}})
    except Exception as e:  # each tracker package raises its own kinds
        if fresh and accelerator.is_main_process:
            shutil.rmtree(run_dir, ignore_errors=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"train.log_with={log_with}: a tracker could not start ({e.__class__.__name__}: "
                        f"{first[:200]}): fix its settings (see its documentation), or drop it from "
                        f"train.log_with") from None


def log_images(accelerator: Accelerator, paths: dict[str, Path], step: int) -> None:
    """The grids just written (name -> PNG) to every tracker, on the main process."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return
    arrays = {}
    for name, path in paths.items():
        with Image.open(path) as im:
            arrays[name] = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: v[None] for k, v in arrays.items()}, step=step, dataformats="NHWC")
        elif tracker.name in ("wandb", "swanlab"):  # a list of images per name
            tracker.log_images({k: [v] for k, v in arrays.items()}, step=step)
        elif tracker.name in ("aim", "clearml"):  # one image per name
            tracker.log_images(arrays, step=step)
        elif hasattr(tracker, "log_artifact"):  # MLflow: the files
            for path in paths.values():
                tracker.log_artifact(str(path), artifact_path="samples")
        # comet_ml, dvclive, trackio: Accelerate has no image call for them; they get the scalars
