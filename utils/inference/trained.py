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

import json
import math
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.objective_rules import perceptual_on
from models.sampler_rules import SAMPLERS, SamplerOptions
from models.samplers import Sampler
from models.vae import VAE
from utils.config import Config, build_config, config_to_dict, load_config
from utils.data.registry import image_shape, load_data
from utils.errors import UserError, unusable_path
from utils.evaluation.bounds import image_bounds
from utils.evaluation.samplers import check_usable, fitted_sampler, kept_folder
from utils.fields import is_whole
from utils.files import save_tensors, tensor_mismatches

HUB_WEIGHTS = "model.safetensors"


class TrainedVAE(VAE, ModelHubMixin, library_name="vae-toolkit", tags=["vae", "pytorch", "generative"]):
    """A VAE for inference, in eval mode. ``vae_config`` is the resolved config as a nested dict (a run's
    config.yaml), ``img_shape`` (C, H, W) the data's, read from the config when omitted."""

    perceptual_terms = False  # training's sharpening terms are not built for inference

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
        model.safetensors), or a Hub repo id (``user/name``, downloaded and cached). Anything that looks like a
        local path (see ``looks_local``) is read as one, and a missing one is named at once, never looked up on
        the Hub. Bad input of any kind is a one-line ``UserError``."""
        folder = Path(path)
        try:
            local = folder.exists() or looks_local(str(path))
        except (OSError, ValueError) as e:  # a name too long for the file system, a NUL character
            raise UserError(unusable_path(e) or f"{path!r} cannot be used as a path ({e})") from None
        return (cls.load_local(folder) if local else cls._load_hub(str(path))).to(device)

    @classmethod
    def load_local(cls, folder: Path) -> TrainedVAE:
        """A run folder or a Hub-format folder on this machine (never looked up on the Hub), on the CPU."""
        what = "pass a run folder (config.yaml + model.safetensors) or a Hub-format folder (config.json + " \
               "model.safetensors)"
        if not folder.exists():
            raise UserError(f"{folder} not found: {what}")
        if not folder.is_dir():
            raise UserError(f"{folder} is a file, not a folder: {what}")
        if (folder / "config.yaml").is_file():
            return load_model(load_config(folder / "config.yaml"), folder / "model.safetensors")
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} has neither config.yaml (a run) nor config.json (a Hub-format folder): {what}")
        try:
            json.loads((folder / "config.json").read_text())
        except (UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{folder / 'config.json'} is damaged ({e.__class__.__name__}): export the run again "
                            f"with python -m utils.inference.export") from None
        return cls.from_pretrained(str(folder))

    @classmethod
    def _load_hub(cls, repo_id: str) -> TrainedVAE:
        try:
            validate_repo_id(repo_id)
        except HFValidationError:
            raise UserError(f"{repo_id!r} is neither an existing folder nor a Hub repo id (user/name): pass a run "
                            f"folder, a Hub-format folder or a repo id") from None
        offline = not hub_reachable()
        try:
            return cls.from_pretrained(repo_id, local_files_only=offline)  # offline: a copy in the cache, if any
        except UserError:
            raise
        except Exception as e:  # no network, no such repository, no access: the library raises many kinds
            if offline:
                raise UserError(f"{repo_id} is not a folder here, and the Hub cannot be reached (no network?) nor "
                                f"holds it in the local cache: pass a local folder, or connect") from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UserError(f"{repo_id} could not be loaded from the Hub ({e.__class__.__name__}: {first[:160]}): "
                            f"check the name and the network, or pass a local folder") from None

    # ---- inference ----------------------------------------------------------------------------------------

    def _to(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device)

    @torch.no_grad()  # a sampler's fit trains under its own enable_grad
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               batch_size: int = 256, sampler: str = "prior", options: SamplerOptions | None = None,
               refit: bool = False, temperature: float = 0.0) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1], the decoder's means at codes drawn from ``sampler`` (the prior, or
        a sampler of ``SAMPLERS`` fitted to the training codes with ``options``, see ``ex_post_sampler``; with a CPU
        ``generator``, the same codes on any device); a conditional model decodes ``labels`` (n,); a Ladder VAE's
        lower layers are drawn at ``temperature`` (0: at their conditional prior means)."""
        if not is_whole(n) or n < 1:
            raise UserError(f"sample(n): n is the number of images, a whole number of at least 1, got {n!r}")
        if not is_whole(batch_size) or batch_size < 1:
            raise UserError(f"sample(batch_size=...) must be a whole number of at least 1, got {batch_size!r}")
        labels = self._checked_labels(labels, n)
        check_usable(self, sampler, api=True)
        z = (self.prior.sample(n, generator) if not SAMPLERS[sampler].fitted
             else self.ex_post_sampler(sampler, refit, options).sample(n, generator)).to(self.device)
        ys = [None] * math.ceil(n / batch_size) if labels is None else labels.split(batch_size)
        return torch.cat([self.decode(part, y, temperature, generator) for part, y in zip(z.split(batch_size), ys)])

    def _checked_labels(self, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """The labels of n images on this model's device, or a one-line refusal of labels it cannot use."""
        if not self.n_classes:
            if labels is not None:
                raise UserError("this model is not conditional (model.conditional=false): call sample without labels")
            return None
        classes = f"a tensor of {n} class indices in 0..{self.n_classes - 1}"
        if labels is None:
            raise UserError(f"this model is conditional: pass labels=, {classes}")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
                or tuple(labels.shape) != (n,) or (len(labels) and not 0 <= labels.min() <= labels.max()
                                                   < self.n_classes):
            raise UserError(f"labels must be {classes}, got {_describe(labels)}")
        return labels.long().to(self.device)

    def ex_post_sampler(self, name: str, refit: bool = False, options: SamplerOptions | None = None) -> Sampler:
        """The sampler ``name``: the prior, or one fitted to this model's training codes with ``options`` (the
        defaults when None): the one kept in its folder, or fitted now (reading the training set its config names)
        and kept there. A kept one fitted with other options is refused until ``refit=True`` or those options."""
        folder = getattr(self, "sampler_folder", None)
        if folder is None:
            raise UserError("this model was not loaded from a folder, where a fitted sampler is kept: load it with "
                            "TrainedVAE.load")
        if options is not None and not isinstance(options, SamplerOptions):
            raise UserError(f"options must be a SamplerOptions, got {type(options).__name__}")
        return fitted_sampler(self, folder, name, lambda: load_data(self.config.data)[0].to(self.device),
                              options or SamplerOptions(), refit, self.device, api=True)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images decoded from their posterior means (a ladder's: through every layer)."""
        x, labels = self._to(x), self._to(labels)
        return self.reconstruction(x, labels)

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
        kind = "conditional " * cfg.model.conditional + f"{cfg.model.likelihood} " + (
            f"autoencoder ({cfg.loss.regulariser})" if self.deterministic else "VAE")
        lines = [f"# A {kind} on {cfg.data.name}", "",
                 f"Trained with vae-toolkit: `{info.get('command', 'python train_vae.py -c config.yaml')}`, "
                 f"the config below; {cfg.train.steps:,} steps at batch {cfg.train.batch_size}.", ""]
        if decoder_terms(cfg.loss):
            lines += [f"The decoder was also trained on {', '.join(decoder_terms(cfg.loss))}. These terms shape the "
                      f"decoder and are no part of log p(x): the bounds below are the likelihood's.", ""]
        from utils.evaluation.metrics import headline  # (here: the metrics load scikit-learn)

        rows = headline(info["eval"]) if info.get("eval") else []
        if rows:  # (an eval.json of metrics without a headline, the samplers' alone, gives no table)
            lines += ["## Held-out numbers (evaluate.py)", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {key} | {value} |" for key, value in rows]
            lines.append("")
        if info.get("latents"):  # a KL autoencoder's diffusers folder (utils/inference/diffusers_export.py)
            lat = info["latents"]
            lines += ["## diffusers", "", "`vae/` is a diffusers `AutoencoderKL` folder "
                      "(`AutoencoderKL.from_pretrained(\"this/folder\", subfolder=\"vae\")`) with "
                      f"scaling_factor = {lat['scaling_factor']:.6g}: 1 / the std of the latents sampled from the "
                      f"posterior over all {lat['images']:,} training images"
                      + (f"; shift_factor = {lat['shift_factor']:.6g}, their mean" if lat["shift_factor"] is not None
                         else "") + ".", ""]
        if info.get("samples"):
            lines += ["## Samples", "", f"![64 prior samples]({info['samples']})", ""]
        lines += ["## Use", "", "```python", "from utils.inference import TrainedVAE",
                  "vae = TrainedVAE.load(\"this/folder\")  # or the Hub repo id",
                  "images = vae.sample(16" + (", labels=torch.full((16,), 3))" if self.n_classes else ")"),
                  "```", "", "## Config", "", "```yaml",
                  yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
        data = ModelCardData(library_name="vae-toolkit", tags=["vae", "pytorch", "generative", cfg.data.name])
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def decoder_terms(loss) -> list[str]:
    """The terms beside the likelihood that trained the decoder (sharpening terms, an image discriminator), in
    words for the model card; none for a run without them."""
    used = [f"{name} (weight {getattr(loss, name):g})" for name in perceptual_on(loss)]
    if loss.disc_weight > 0:
        used.append(f"a PatchGAN discriminator ({loss.disc_loss} loss, weight {loss.disc_weight:g} times the adaptive "
                    f"weight, from step {loss.disc_start:,})")
    return used


def hub_reachable() -> bool:
    """Whether the Hub's host resolves (one quick name look-up), so that an offline machine is told so at once
    instead of after the download library's half-minute of retries. False in offline mode (HF_HUB_OFFLINE)."""
    if hf_constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.getaddrinfo(urlparse(hf_constants.ENDPOINT).hostname, 443)
    except (OSError, UnicodeError):
        return False
    return True


def looks_local(path: str) -> bool:
    """Whether a path names something on this machine rather than a Hub repo id: absolute, ``./``, ``../``, ``~``,
    more than one ``/`` (a repo id has exactly one), or a parent folder that exists here."""
    parent = Path(path).parent
    return (Path(path).is_absolute() or path.startswith(("./", "../", "~")) or path in (".", "..", "")
            or path.count("/") > 1 or (parent != Path(".") and parent.exists()))


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
    model.sampler_folder = kept_folder(weights)  # where the samplers fitted to these weights are kept
    return model.eval()


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}" + (
            f" with values {value.min().item()}..{value.max().item()}" if value.numel() else "")
    return type(value).__name__
