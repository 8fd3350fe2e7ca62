"""A trained VAE from Python: load a run or a Hub-format folder in one line, then sample, encode, decode,
reconstruct and bound the log-likelihood; save it in the Hugging Face Hub layout with a model card.

    from utils.inference import TrainedVAE
    vae = TrainedVAE.load("runs/mnist-20261202-101500")     # or a Hub-format folder, or a Hub repo id
    x = vae.sample(16)                                      # (16, 1, 28, 28) in [0, 1]
    mu, logvar = vae.encode(x)
    nats = vae.log_likelihood(x, k=1000)                    # (16,) IWAE bound on log p(x)

(The exporter, ``python -m utils.inference.export runs/X hub/X``, is utils/inference/export.py.)

``TrainedVAE`` is the toolkit's ``VAE`` with the Hub's ``ModelHubMixin``: the layout is
``config.json`` (the resolved config and image shape), ``model.safetensors`` (the same
tensors as a run's) and ``README.md`` (the model card). sample.py and evaluate.py load
their models through it, and its bound is evaluate.py's computation, so they cannot
drift. Loading reads safetensors only: a folder with pickled weights is refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.vae import VAE
from utils.config import Config, build_config, config_to_dict, load_config
from utils.data.registry import image_shape
from utils.errors import UserError
from utils.evaluation.bounds import image_bounds
from utils.evaluation.metrics import headline
from utils.files import save_tensors, tensor_mismatches

HUB_WEIGHTS = "model.safetensors"


class TrainedVAE(VAE, ModelHubMixin, library_name="vae-toolkit", tags=["vae", "pytorch", "generative"]):
    """A VAE for inference, in eval mode. ``vae_config`` is the resolved config as a nested dict (a run's
    config.yaml), ``img_shape`` (C, H, W) the data's, read from the config when omitted."""

    def __init__(self, vae_config: dict, img_shape: list[int] | None = None):
        cfg = build_config(vae_config)  # validated, as a YAML file would be
        super().__init__(cfg.model, cfg.loss, tuple(img_shape) if img_shape else image_shape(cfg.data),
                         cfg.train.batch_size)
        self.config = cfg
        self.eval()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> TrainedVAE:
        """A run directory (config.yaml + model.safetensors), a Hub-format folder (config.json +
        model.safetensors), or a Hub repo id (downloaded, cached)."""
        path = Path(path)
        if (path / "config.yaml").is_file():
            return load_model(load_config(path / "config.yaml"), path / "model.safetensors", device)
        return cls.from_pretrained(str(path)).to(device)

    # ---- inference ----------------------------------------------------------------------------------------

    def _to(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               batch_size: int = 256) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1], the decoder's means at codes drawn from the prior (with a CPU
        ``generator``, the same codes on any device); a conditional model decodes ``labels`` (n,)."""
        z = self.prior.sample(n, generator).to(self.device)
        ys = [None] * math.ceil(n / batch_size) if labels is None else self._to(labels).split(batch_size)
        return torch.cat([self.decode(part, y) for part, y in zip(z.split(batch_size), ys)])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images decoded from their posterior means."""
        x, labels = self._to(x), self._to(labels)
        return self.decode(self.encode(x, labels)[0], labels)

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, k: int = 1000, labels: torch.Tensor | None = None,
                       chunk: int = 100) -> torch.Tensor:
        """The importance-weighted bound on log p(x) (log p(x|y) for a conditional model) with k samples, per
        image (B,), in nats: evaluate.py's computation, on images as given (binarise or dequantise first, as
        evaluate.py does, to compare with its numbers)."""
        return image_bounds(self, self._to(x), k, self._to(labels), chunk)[0]

    # ---- the Hub layout -------------------------------------------------------------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        save_tensors(self.state_dict(), Path(save_directory) / HUB_WEIGHTS, metadata={"format": "pt"})

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, **model_kwargs) -> TrainedVAE:
        folder = Path(model_id)
        if folder.is_dir():
            weights = folder / HUB_WEIGHTS
            if not weights.is_file():
                found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
                raise UserError(f"{folder} has no {HUB_WEIGHTS} (found: {found}): only safetensors weights are "
                                f"loaded; export the run again with python -m utils.inference.export")
        else:
            from huggingface_hub import hf_hub_download

            weights = Path(hf_hub_download(model_id, HUB_WEIGHTS, revision=revision, cache_dir=cache_dir,
                                           force_download=force_download, token=token,
                                           local_files_only=local_files_only))
        if "vae_config" not in model_kwargs:
            raise UserError(f"{model_id} has no config.json with a vae_config: it is not a folder this toolkit "
                            f"exported")
        return fill_checked(cls(**model_kwargs), weights)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The card: data set, how it was trained, the held-out numbers (eval.json), the config, samples."""
        info = getattr(self, "_card", {})
        cfg = self.config
        kind = "conditional " * cfg.model.conditional + f"{cfg.model.likelihood} VAE"
        lines = [f"# A {kind} on {cfg.data.name}", "",
                 f"Trained with vae-toolkit: `{info.get('command', 'python train_vae.py -c config.yaml')}`, "
                 f"the config below; {cfg.train.steps:,} steps at batch {cfg.train.batch_size}.", ""]
        evaluation = info.get("eval")
        if evaluation:
            lines += ["## Held-out numbers (evaluate.py)", "", "| metric | value |", "| --- | --- |"]
            for key, value in headline(evaluation):
                lines.append(f"| {key} | {value} |")
            lines.append("")
        if info.get("samples"):
            lines += ["## Samples", "", f"![64 prior samples]({info['samples']})", ""]
        lines += ["## Use", "", "```python", "from utils.inference import TrainedVAE",
                  "vae = TrainedVAE.load(\"this/folder\")  # or the Hub repo id",
                  "images = vae.sample(16" + (", labels=torch.full((16,), 3))" if self.n_classes else ")"),
                  "```", "", "## Config", "", "```yaml",
                  yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
        data = ModelCardData(library_name="vae-toolkit", tags=["vae", "pytorch", "generative", cfg.data.name])
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


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
