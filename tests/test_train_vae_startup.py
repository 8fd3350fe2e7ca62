"""train_vae.py answers --help, argument and config errors, and --dry-run before the heavy libraries load: torch
and the rest take seconds to import, and a typo in a flag or a config should not cost that wait. Read from the
interpreter's own import log (``python -X importtime``), in a fresh process each."""

from __future__ import annotations

import pytest

from conftest import free_port, run_script

HEAVY = {"torch", "torchvision", "accelerate", "sklearn", "matplotlib", "datasets"}


def imported(stderr: str) -> set[str]:
    """The top-level packages that ``-X importtime`` logged as imported."""
    return {line.split("|")[2].strip().split(".")[0] for line in stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2} - {"package"}


@pytest.mark.parametrize("args, rc, said", [
    (["--help"], 0, "usage: train_vae.py"),
    (["-c"], 2, "error: argument -c/--config: expected one argument"),
    (["-r", "latest", "--overwrite"], 2, "error: --overwrite starts a run afresh and -r continues one"),
    ([], 2, "error: no config given"),
])
def test_help_and_argument_errors_load_no_heavy_library(args, rc, said):
    res = run_script(["-X", "importtime", "train_vae.py", *args])
    assert res.returncode == rc and said in res.stdout + res.stderr, res.stderr[-2000:]
    logged = imported(res.stderr)
    assert "utils" in logged  # the log is read: the toolkit's own modules show in it
    assert not logged & HEAVY, sorted(logged & HEAVY)


@pytest.mark.parametrize("args, said", [
    (["-c", "configs/mnist.yaml", "loss.betta=3"], "unknown config key 'loss.betta'"),
    (["-c", "configs/mnist.yaml", "loss.regulariser=mmdd"], "expected one of kl, none, mmd"),
    (["-c", "configs/mnist.yaml", "train.lr=-1"], "train.lr"),
])
def test_a_config_key_error_loads_no_heavy_library(args, said):
    """A key or a value the schema refuses (an unknown key, a part no registry holds, a value out of range) is said
    before torch loads: the registries' names are read without importing their modules."""
    res = run_script(["-X", "importtime", "train_vae.py", *args])
    assert res.returncode == 2 and said in res.stderr, res.stderr[-2000:]
    logged = imported(res.stderr)
    assert "utils" in logged and not logged & HEAVY, sorted(logged & HEAVY)


@pytest.mark.parametrize("args, rc, said", [
    (["-c", "configs/mnist.yaml", "loss.regulariser=mmd"], 2, "error: loss.regulariser=mmd needs loss.mmd_weight > 0"),
    (["-c", "configs/mnist.yaml", "loss.objective=ae"], 2, "error: loss.objective=ae has no posterior variance"),
    (["-c", "configs/mnist.yaml", "--dry-run"], 0, "# would train into runs/mnist-"),
    # the parts complete the config from the data set's metadata: its training images, its classes
    (["-c", "configs/mnist.yaml", "--dry-run", "loss.regulariser=tcvae"], 0, "tc_dataset_size: 60000"),
    (["-c", "configs/mnist.yaml", "--dry-run", "model.conditional=true"], 0, "n_classes: 10"),
])
def test_rules_across_parts_and_dry_runs_load_no_heavy_library(args, rc, said):
    """A rule across parts asks the chosen parts' rules classes, and a dry run completes the config from the data
    set's counts, all without torch: a process started alone is the main one of one, read from the environment."""
    res = run_script(["-X", "importtime", "train_vae.py", *args])
    assert res.returncode == rc and said in res.stdout + res.stderr, res.stderr[-2000:]
    logged = imported(res.stderr)
    assert "utils" in logged and not logged & HEAVY, sorted(logged & HEAVY)


@pytest.mark.parametrize("env, loads", [
    # a bf16 run's warning asks for the device, which accelerate gives
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, {"torch", "accelerate"}),
    # a process a launcher started (LOCAL_RANK) builds accelerate's state: one process per machine counts first
    ({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}, {"torch", "accelerate"}),
])
def test_a_dry_run_loads_accelerate_where_it_asks_it(env, loads):
    """The reading sees torch and accelerate where they load; the rest stays unloaded."""
    res = run_script(["-X", "importtime", "train_vae.py", "-c", "configs/mnist.yaml", "--dry-run"],
                     env={**env, "MASTER_PORT": str(free_port())} if "LOCAL_RANK" in env else env)
    assert res.returncode == 0 and "# would train into" in res.stdout, res.stderr[-2000:]
    logged = imported(res.stderr)
    assert logged & HEAVY == loads, sorted(logged & HEAVY)
