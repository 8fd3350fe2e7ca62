"""Save a run in the Hugging Face Hub layout, and optionally upload it.

    python -m utils.inference.export runs/X hub/X [--push_to_hub user/name] [--shift_factor]

The folder holds ``config.json`` (the resolved config and image shape), ``model.safetensors``
(the same tensors as the run's), ``README.md`` (the model card, with the held-out numbers of the
run's eval.json) and ``samples.png`` (64 prior samples, seed 0). ``TrainedVAE.load`` reads it back. A KL
autoencoder (``model.net=klae``) also gets ``vae/``, the folder ``diffusers.AutoencoderKL`` loads, with its
``scaling_factor`` measured over the training split (utils/inference/diffusers_export.py).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from utils.errors import CliParser, UserError, guarded_main
from utils.evaluation.metrics import headline
from utils.evaluation.samplers import FOLDER as SAMPLER_FOLDER
from utils.evaluation.samplers import kept_sampler_files
from utils.files import is_disk_error, private_temporary, remove_stale_temporaries, write_failure
from utils.grids import save_grid
from utils.inference.diffusers_export import FOLDER as DIFFUSERS_FOLDER
from utils.inference.diffusers_export import diffusers_folder, has_diffusers_form, latent_statistics
from utils.inference.trained import TrainedVAE
from utils.training.run_folder import started_with


def export(run: Path, out: Path, push_to_hub: str | None = None, shift_factor: bool = False) -> Path:
    """Save a run in the Hub layout into the empty folder ``out`` (with 64 samples and the model card), and
    upload it to ``push_to_hub`` (a repo id) when given: that needs network and a token (``hf auth login``).
    A KL autoencoder's diffusers folder gets a ``shift_factor`` when ``shift_factor`` is true.

    The folder is built aside (a temporary sibling) and renamed into place only complete: a failure at any
    point (a full disk, a file-size limit, an interrupt) leaves ``out`` as it was, and the export can be rerun."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file: export into a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: export into a new or empty folder")
    if out.is_symlink() and out.is_dir():  # an empty folder reached through a link: the folder is the target
        out = out.resolve()
    vae = TrainedVAE.load_local(run)  # a run on this machine: its eval.json and command.txt are read too
    command = started_with(run) or f"python train_vae.py -c config.yaml -e {run.name}"  # (runs before command.txt)
    vae._card = {"command": shown(command), "eval": read_evaluation(run)}
    if shift_factor and not has_diffusers_form(vae):
        raise UserError(f"--shift_factor is a diffusers AutoencoderKL's, and {run} is model.net="
                        f"{vae.config.model.net}: drop it (only model.net=klae runs export a diffusers folder)")
    if has_diffusers_form(vae):  # the latents' scale, over the whole training split, before anything is written
        from utils.data.registry import load_data

        mean, std, images = latent_statistics(vae, load_data(vae.config.data)[0])
        vae._card["latents"] = {"scaling_factor": 1 / std, "shift_factor": mean if shift_factor else None,
                                "images": images}
    aside = private_temporary(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out.parent)  # folders built aside by exports that were killed
        aside.mkdir()
    except OSError as e:
        raise UserError(f"cannot create {out} ({e.strerror}): export into a folder you can write") from None
    try:
        build(vae, run, aside)
        os.replace(aside, out)  # (over an empty folder too)
    except BaseException as e:
        shutil.rmtree(aside, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOTEMPTY:
            raise UserError(f"{out} was filled while the export ran: export into a new or empty folder") from None
        if isinstance(e, OSError) and e.errno in (errno.EBUSY, errno.EXDEV):  # the empty folder is a mount point
            raise UserError(f"{out} cannot be replaced ({e.strerror}: a mount point?): export into a new folder "
                            f"inside it") from None
        if is_disk_error(e):
            raise UserError(write_failure(e, out, "then export again")) from None
        raise
    if push_to_hub:
        try:
            # the folder as written: the library's push_to_hub would upload a fresh save_pretrained, without
            # samples.png, the fitted samplers and a KL autoencoder's vae/
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(push_to_hub, exist_ok=True)
            api.upload_folder(repo_id=push_to_hub, folder_path=out, commit_message="vae-toolkit export")
        except Exception as e:  # network, authentication and repository errors all end here
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise UserError(f"the upload to {push_to_hub} failed ({e.__class__.__name__}: {first[:200]}): the "
                            f"folder {out} is complete; log in (hf auth login) and upload it when online") from None
    return out


def build(vae: TrainedVAE, run: Path, folder: Path) -> None:
    """The Hub layout of ``vae`` (from ``run``) in the empty ``folder``."""
    # only the sampler files that fit this model travel with it: never a temporary, a damaged or a stale one
    kept, left_out = kept_sampler_files(run, vae)
    for line in left_out:
        print(f"warning: {line}", file=sys.stderr)
    # 64 samples: from the prior, or, for an autoencoder without one, from the first sampler fitted to its codes
    sampler = "prior" if vae.has_prior else next(iter(kept), None)
    if sampler is not None:
        options = kept[sampler][1] if sampler in kept else None
        save_grid(vae.sample(64, vae.grid_labels(64), torch.Generator().manual_seed(0), sampler=sampler,
                             options=options).cpu(), folder / "samples.png", per_row=8)
    vae._card["samples"] = "samples.png" if sampler else None
    vae.save_pretrained(folder)
    if "latents" in vae._card:
        diffusers_folder(vae, folder / DIFFUSERS_FOLDER, vae._card["latents"]["scaling_factor"],
                         vae._card["latents"]["shift_factor"])
    for path, _ in kept.values():  # fitted samplers travel with the model
        (folder / SAMPLER_FOLDER).mkdir(exist_ok=True)
        shutil.copy2(path, folder / SAMPLER_FOLDER / path.name)


def read_evaluation(run: Path) -> dict | None:
    """The run's eval.json for the card, or None without one; a damaged one is refused before anything is
    written (a card must not quote half a file)."""
    path = run / "eval.json"
    if not path.is_file():
        return None
    try:
        evaluation = json.loads(path.read_text())
        headline(evaluation)  # every entry the card quotes is whole
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is damaged ({e.__class__.__name__}): evaluate the run again (python evaluate.py "
                        f"--exp_dir {run}), or move the file aside to export without its numbers") from None
    return evaluation


def shown(text: str) -> str:
    """Text read with the file system's undecodable bytes kept (a run folder whose name is not UTF-8), made
    printable for the card: each such byte becomes U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def main(argv: list[str]) -> None:
    p = CliParser(description="Save a run in the Hugging Face Hub layout (config.json, model.safetensors, model "
                              "card, samples).", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (config.yaml + model.safetensors)")
    p.add_argument("out", help="new or empty folder for the Hub layout")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="also upload to this Hub repository")
    p.add_argument("--shift_factor", action="store_true", help="model.net=klae: also write the latents' mean "
                   "as the diffusers folder's shift_factor")
    args = p.parse_args(argv)
    print(f"wrote {export(Path(args.run), Path(args.out), args.push_to_hub, args.shift_factor)}")


if __name__ == "__main__":
    guarded_main(main)
