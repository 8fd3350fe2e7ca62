"""A trained VAE from Python: load a run or a Hub-format folder in one line, then sample, encode, decode,
reconstruct and bound the log-likelihood; save it in the Hugging Face Hub layout with a model card.

    from utils.inference.trained import TrainedVAE
    vae = TrainedVAE.load("runs/mnist-20261202-101500")     # or a Hub-format folder, or a Hub repo id
    x = vae.sample(16)                                      # (16, 1, 28, 28) in [0, 1]
    mu, logvar = vae.encode(x)
    nats = vae.log_likelihood(x, k=1000)                    # (16,) IWAE bound on log p(x)

    python -m utils.inference.trained runs/X hub/X [--push_to_hub user/name]

``TrainedVAE`` is the toolkit's ``VAE`` with the Hub's ``ModelHubMixin``: the layout is
``config.json`` (the resolved config and image shape), ``model.safetensors`` (the same
tensors as a run's) and ``README.md`` (the model card). sample.py and evaluate.py load
their models through it, and its bound is evaluate.py's computation, so they cannot
drift. Loading reads safetensors only: a folder with pickled weights is refused.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin
from safetensors.torch import save_file

from models.vae import VAE
from utils.config import build_config, config_to_dict, load_config
from utils.data.registry import image_shape
from utils.errors import UserError

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
        from utils.inference.loading import load_model  # (loading builds this class)

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
        from utils.evaluation.bounds import image_bounds

        return image_bounds(self, self._to(x), k, self._to(labels), chunk)[0]

    # ---- the Hub layout -------------------------------------------------------------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        weights = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(weights, str(Path(save_directory) / HUB_WEIGHTS), metadata={"format": "pt"})

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, **model_kwargs) -> TrainedVAE:
        from utils.inference.loading import fill_checked

        folder = Path(model_id)
        if folder.is_dir():
            weights = folder / HUB_WEIGHTS
            if not weights.is_file():
                found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
                raise UserError(f"{folder} has no {HUB_WEIGHTS} (found: {found}): only safetensors weights are "
                                f"loaded; export the run again with python -m utils.inference.trained")
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
            for key, value in _headline(evaluation):
                lines.append(f"| {key} | {value} |")
            lines.append("")
        if info.get("samples"):
            lines += ["## Samples", "", f"![64 prior samples]({info['samples']})", ""]
        lines += ["## Use", "", "```python", "from utils.inference.trained import TrainedVAE",
                  "vae = TrainedVAE.load(\"this/folder\")  # or the Hub repo id",
                  "images = vae.sample(16" + (", labels=torch.full((16,), 3))" if self.n_classes else ")"),
                  "```", "", "## Config", "", "```yaml",
                  yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
        data = ModelCardData(library_name="vae-toolkit", tags=["vae", "pytorch", "generative", cfg.data.name])
        return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def _headline(evaluation: dict) -> list[tuple[str, str]]:
    rows = []
    if "nll" in evaluation:
        n = evaluation["nll"]
        rows.append((f"NLL (IWAE, k={n['k']}, {n['n']} images)", f"{n['nll']:.2f} nats ({n['nll_bpd']:.4f} bits/dim)"))
    if "elbo" in evaluation:
        rows.append(("ELBO", f"{evaluation['elbo']['elbo']:.2f} nats"))
    if "au" in evaluation:
        rows.append(("active units", f"{evaluation['au']['active_units']} of {evaluation['au']['z_dim']}"))
    if "fid" in evaluation:
        rows.append(("FID", f"{evaluation['fid']['fid']:.2f} ({evaluation['fid']['n']} samples)"))
    return rows


def export(run: Path, out: Path, push_to_hub: str | None = None) -> Path:
    """Save a run in the Hub layout into the empty folder ``out`` (with 64 samples and the model card), and
    upload it to ``push_to_hub`` (a repo id) when given: that needs network and a token (``hf auth login``)."""
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: export into a new or empty folder")
    vae = TrainedVAE.load(run)
    out.mkdir(parents=True, exist_ok=True)
    from utils.grids import save_grid

    save_grid(vae.sample(64, vae.grid_labels(64), torch.Generator().manual_seed(0)).cpu(), out / "samples.png",
              per_row=8)
    vae._card = {"command": f"python train_vae.py -c config.yaml -e {run.name}", "samples": "samples.png"}
    if (run / "eval.json").is_file():
        vae._card["eval"] = json.loads((run / "eval.json").read_text())
    vae.save_pretrained(out)
    if push_to_hub:
        try:
            vae.push_to_hub(push_to_hub)
        except Exception as e:  # network, authentication and repository errors all end here
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UserError(f"the upload to {push_to_hub} failed ({e.__class__.__name__}: {first[:200]}): the "
                            f"folder {out} is complete; log in (hf auth login) and upload it when online") from None
    return out


def main(argv: list[str]) -> None:
    from utils.errors import CliParser

    p = CliParser(description="Save a run in the Hugging Face Hub layout (config.json, model.safetensors, model "
                              "card, samples).", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (config.yaml + model.safetensors)")
    p.add_argument("out", help="new or empty folder for the Hub layout")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload to this Hub repository")
    args = p.parse_args(argv)
    print(f"wrote {export(Path(args.run), Path(args.out), args.push_to_hub)}")


if __name__ == "__main__":
    from utils.errors import run_cli

    run_cli(main)
