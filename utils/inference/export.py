"""Save a run in the Hugging Face Hub layout, and optionally upload it.

    python -m utils.inference.export runs/X hub/X [--push_to_hub user/name]

The folder holds ``config.json`` (the resolved config and image shape), ``model.safetensors``
(the same tensors as the run's), ``README.md`` (the model card, with the held-out numbers of the
run's eval.json) and ``samples.png`` (64 prior samples, seed 0). ``TrainedVAE.load`` reads it back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from utils.errors import CliParser, UserError, guarded_main
from utils.evaluation.samplers import FOLDER as SAMPLER_FOLDER
from utils.evaluation.samplers import kept_sampler_files
from utils.grids import save_grid
from utils.inference.trained import TrainedVAE
from utils.training.run_folder import started_with


def export(run: Path, out: Path, push_to_hub: str | None = None) -> Path:
    """Save a run in the Hub layout into the empty folder ``out`` (with 64 samples and the model card), and
    upload it to ``push_to_hub`` (a repo id) when given: that needs network and a token (``hf auth login``)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: export into a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: export into a new or empty folder")
    vae = TrainedVAE.load_local(run)  # a run on this machine: its eval.json and command.txt are read too
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out} ({e.strerror}): export into a folder you can write") from None
    # only the sampler files that fit this model travel with it: never a temporary, a damaged or a stale one
    kept, left_out = kept_sampler_files(run, vae)
    for line in left_out:
        print(f"warning: {line}", file=sys.stderr)
    # 64 samples: from the prior, or, for an autoencoder without one, from the first sampler fitted to its codes
    sampler = "prior" if vae.has_prior else next(iter(kept), None)
    if sampler is not None:
        options = kept[sampler][1] if sampler in kept else None
        save_grid(vae.sample(64, vae.grid_labels(64), torch.Generator().manual_seed(0), sampler=sampler,
                             options=options).cpu(), out / "samples.png", per_row=8)
    command = started_with(run) or f"python train_vae.py -c config.yaml -e {run.name}"  # (runs before command.txt)
    vae._card = {"command": command, "samples": "samples.png" if sampler else None}
    if (run / "eval.json").is_file():
        vae._card["eval"] = json.loads((run / "eval.json").read_text())
    vae.save_pretrained(out)
    for path, _ in kept.values():  # fitted samplers travel with the model
        (out / SAMPLER_FOLDER).mkdir(exist_ok=True)
        shutil.copy2(path, out / SAMPLER_FOLDER / path.name)
    if push_to_hub:
        try:
            vae.push_to_hub(push_to_hub)
        except Exception as e:  # network, authentication and repository errors all end here
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UserError(f"the upload to {push_to_hub} failed ({e.__class__.__name__}: {first[:200]}): the "
                            f"folder {out} is complete; log in (hf auth login) and upload it when online") from None
    return out


def main(argv: list[str]) -> None:
    p = CliParser(description="Save a run in the Hugging Face Hub layout (config.json, model.safetensors, model "
                              "card, samples).", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (config.yaml + model.safetensors)")
    p.add_argument("out", help="new or empty folder for the Hub layout")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload to this Hub repository")
    args = p.parse_args(argv)
    print(f"wrote {export(Path(args.run), Path(args.out), args.push_to_hub)}")


if __name__ == "__main__":
    guarded_main(main)
