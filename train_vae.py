"""Train a VAE from a YAML config, on one CPU or many GPUs, with Accelerate.

    python train_vae.py -c configs/mnist.yaml                       # one device
    accelerate launch train_vae.py -c configs/mnist.yaml            # as `accelerate config` says
    python train_vae.py -c configs/mnist.yaml loss.beta=4 --train.lr 3e-4
    python train_vae.py -c configs/mnist.yaml --dry-run             # print the resolved config, touch nothing
    python train_vae.py -c configs/mnist.yaml -r latest             # resume the newest run of this config

This script only resolves and validates the config, checks the run directory,
and hands over to ``utils.training.loop.train``, which writes config.yaml into the run
directory once data and model have loaded, then trains.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

# only what --help and the argument checks need: the toolkit loads in main, once the arguments are known good (a
# typo in a flag is answered at once), and torch and accelerate only to train (or to learn a bf16 run's device)
from utils.errors import CliParser, UserError, guarded_main
from utils.training.config import native_cpu_bf16, run_precision

if TYPE_CHECKING:
    from accelerate import PartialState

    from utils.config import Config


def parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
                  epilog="Any other argument overrides a config key: loss.beta=4 or --loss.beta 4. "
                         "--debug shows tracebacks.")
    p.add_argument("-c", "--config", help="YAML config (see configs/)")
    p.add_argument("-e", "--exp_dir", help="run directory (default runs/<config name>-<time>)")
    p.add_argument("-r", "--resume", help="'latest' or a checkpoint / run directory to resume")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --exp_dir (deleted once the new run's data and model load)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config as YAML and exit without touching the disk")
    return p


def command_line(argv: list[str], num_processes: int) -> str:
    """The command as a user would type it again (recorded in the run's command.txt, quoted by the model card)."""
    launcher = f"accelerate launch --num_processes {num_processes} " if num_processes > 1 else "python "
    return launcher + shlex.join(["train_vae.py", *argv])


def launch_warnings(num_processes: int) -> list[str]:
    """A launch that asked for several processes and got one: ``accelerate launch --num_processes N`` without
    ``--multi_gpu`` runs one process, and says so only in the launcher's set-up (MASTER_PORT, no WORLD_SIZE)."""
    if num_processes == 1 and "MASTER_PORT" in os.environ and "WORLD_SIZE" not in os.environ:
        return ["the launch asked for several processes but this run has one (accelerate launch --num_processes "
                "without --multi_gpu starts one): add --multi_gpu (with ACCELERATE_USE_CPU=1 on CPUs), or drop "
                "--num_processes"]
    return []


def precision_warnings(precision: str, device_type: str) -> list[str]:
    """bf16 on a CPU without bf16 instructions: the run is correct but slower than fp32, the opposite of why one
    asks for bf16 (benchmarks/README.md has the figures). ``precision`` is train.mixed_precision; ``launcher``
    reads accelerate's setting as the Accelerator will."""
    precision = run_precision(precision)
    if precision == "bf16" and device_type == "cpu" and not native_cpu_bf16():
        return ["bf16 on this CPU runs through converting kernels (it has no AVX-512 BF16 or AMX instructions) and "
                "trains several times slower than fp32: use train.mixed_precision=no here"]
    return []


def main(argv: list[str]) -> None:
    args, overrides = parser().parse_known_args(argv)
    if args.resume and args.overwrite:
        raise UserError("--overwrite starts a run afresh and -r continues one: pass only one of them")
    if not args.resume and args.config is None:
        raise UserError("no config given: pass one with -c, e.g. -c configs/mnist.yaml")
    from utils.config import complete_config, config_yaml, load_config, run_warnings

    if args.resume:
        from utils.training.checkpoints import resolve_resume

        state = process_state()
        # (said once the run is locked, below: a checkpoint that another trainer is writing is not incomplete)
        run_dir, ckpt = resolve_resume(args.resume, args.exp_dir, args.config,
                                       verbose=state.is_main_process and args.dry_run)
        cfg = load_config(run_dir / "config.yaml", overrides)  # the run's own config; overrides may extend steps
    else:
        from utils.training.run_folder import default_run_dir

        cfg = load_config(args.config, overrides)  # (a config error is said before accelerate loads)
        ckpt = None
        run_dir = Path(args.exp_dir) if args.exp_dir else default_run_dir(args.config)
        state = OneProcess() if args.dry_run and not launched() else process_state()
    # what parts derive from the data (an older run's 0s too), so that --dry-run shows it; counting may fill a
    # cache (a Hugging Face set), so one process per machine counts first, as loading does
    with state.local_main_process_first():
        complete_config(cfg)
    precision = run_precision(cfg.train.mixed_precision)  # accelerate's setting, checked as the config's is
    if state.is_main_process:
        warnings = run_warnings(cfg) + launch_warnings(state.num_processes)
        if precision == "bf16":  # (only then is the device asked for, which a dry run learns from accelerate)
            warnings += precision_warnings(precision, state.device.type)
        for line in warnings:
            print(f"warning: {line}", file=sys.stderr)
    if args.dry_run:
        if state.is_main_process:
            what = f"resume {ckpt}" if ckpt else f"train into {run_dir}"
            print(f"# would {what}\n{config_yaml(cfg)}", end="")
        return
    start(args, cfg, run_dir, ckpt, state, command_line(argv, state.num_processes))


def process_state() -> PartialState:
    """Accelerate's view of this process (its index, the process count, its device), read from the environment
    as the Accelerator will read it; every process builds the same."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def launched() -> bool:
    """Whether a launcher started this process as one of several, read from the environment as accelerate's
    PartialState reads it (LOCAL_RANK set, or a world size above 1 from torchrun, MPI or ``accelerate launch``), or
    a TPU could make it one (torch_xla installed)."""
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    world = next((int(os.environ[k]) for k in sizes if k in os.environ), 1)
    return (int(os.environ.get("LOCAL_RANK", -1)) != -1 or world > 1
            or importlib.util.find_spec("torch_xla") is not None)


class OneProcess:
    """A dry run's view of a process started alone (``launched()`` is false): the one process, and the main one,
    as accelerate's PartialState would say, without importing accelerate or torch. Only a bf16 run asks for its
    device, which accelerate then gives. (A launched dry run builds accelerate's state, whose barriers let one
    process per machine count the data first.)"""

    num_processes = 1
    is_main_process = True

    def local_main_process_first(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @property
    def device(self):  # torch.device
        return process_state().device


def start(args: argparse.Namespace, cfg: Config, run_dir: Path, ckpt: Path | None, state: PartialState,
          command: str) -> None:
    """Check (and to resume, lock) the run directory, agreed by every process, and train into it. The training
    code loads only here: a dry run or a config error needs none of it."""
    from accelerate.utils import broadcast_object_list

    from utils.files import DISK_ERRORS, disk_advice
    from utils.training.checkpoints import after_failed_write, resolve_resume
    from utils.training.loop import train
    from utils.training.run_folder import check_name, check_new_run_dir, check_writable, lock_run, unlock_run

    check_name(run_dir)
    if ckpt is None:
        check_new_run_dir(run_dir, args.overwrite)
    refused = None
    if state.is_main_process:  # one process writes the run folder: it checks and (to resume) locks it
        try:
            check_writable(run_dir)
            if ckpt is not None:
                lock_run(run_dir)
        except UserError as e:
            refused = str(e)
    if state.num_processes > 1:  # every process must agree on the run directory (its default name holds the time)
        run_dir, refused = broadcast_object_list([str(run_dir), refused])
        run_dir = Path(run_dir)
    if refused:
        raise UserError(refused)
    state.wait_for_everyone()  # all have checked the directory before the main process writes into it
    try:
        if ckpt is not None:  # now that no other trainer writes into the run
            run_dir, ckpt = resolve_resume(args.resume, str(run_dir) if args.resume == "latest" else None, None,
                                           verbose=state.is_main_process)
        train(cfg, run_dir, ckpt, args.overwrite, command)
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        raise UserError(f"cannot write {e.filename or run_dir} ({e.strerror}): {disk_advice(e, run_dir)}, then "
                        f"{after_failed_write(run_dir)}") from None
    finally:
        unlock_run(run_dir)

if __name__ == "__main__":
    guarded_main(main)
