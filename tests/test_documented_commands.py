"""The commands of README.md and docs/*.md work as a user pastes them. Every command of a fenced bash block is
classified below, so a command added to the docs fails here until it is; each one that runs offline in seconds is
run, in this process, from a folder laid out as a clone in use (configs/, data/MNIST, runs/X), so a documented
command that stops working fails here too. Blocks are separate tests, which pytest-xdist spreads over workers."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import DATA, REPO, Result, cli, require_data, train

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BASH_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.MULTILINE | re.DOTALL)
COMMENT = re.compile(r"\s+# ")  # where a trailing comment may start: a space, a hash and a space

RUN = "runs here as pasted"
# appended arguments cut only training steps, held-out images evaluated, or name the data folder
SHORT = "runs here with the arguments given appended (as pasted it runs for minutes)"
NETWORK = "needs the network"
PROCESSES = "needs a GPU, several processes or a cluster"
LONG = "too long for the suite"

# appended to a documented training command: the config's own steps take a minute or more, and its final evaluation
# on all 10,000 test images seconds more for a conv net
STEPS = ["train.steps=20", "train.eval_samples=500"]
FEW = ["--n_test", "100"]  # appended to a documented evaluation: all 10,000 test images at k = 1000 take minutes

# Every command of README.md and docs/*.md (continuation lines joined, trailing comments dropped): its class, and
# for SHORT the arguments appended, for the others the reason it does not run here.
COMMANDS: dict[str, tuple[str, list[str] | str]] = {
    # README.md
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt":
        (NETWORK, "installs the requirements from the package index"),
    "python3 -m venv .venv && . .venv/bin/activate && pip install torch torchvision --index-url "
    "https://download.pytorch.org/whl/cpu": (NETWORK, "installs PyTorch's CPU build from PyTorch's own index"),
    "pip install -r requirements.txt": (NETWORK, "installs from the package index"),
    "python train_vae.py -c configs/mnist.yaml": (SHORT, STEPS),
    "python sample.py --exp_dir runs/X --mode sample": (RUN, []),
    "python evaluate.py --exp_dir runs/X": (SHORT, FEW),
    "python train_vae.py -c configs/celeba.yaml -e runs/celeba-cpu data.root=../shared/data/celeba-10k "
    "data.cache=true train.steps=4792": (LONG, "68 minutes of training; decoding the 10,000 faces alone takes longer "
                                                "than this whole test"),
    "python sample.py --exp_dir runs/celeba-cpu --mode sample": (LONG, "needs the CelebA run of the line above"),
    "python sample.py --exp_dir runs/celeba-cpu --mode sample --sampler gmm":
        (LONG, "needs the CelebA run of the line above"),
    # docs/configuration.md and docs/models.md
    "python train_vae.py -c configs/mnist_beta_vae.yaml loss.beta=8": (SHORT, STEPS),
    "python train_vae.py -c configs/mnist_beta_vae.yaml --loss.beta 8 --train.lr 3e-4 -e runs/beta8": (SHORT, STEPS),
    "python train_vae.py -c configs/binarized_mnist_hvae.yaml -e runs/hvae": (SHORT, STEPS),
    "python evaluate.py --exp_dir runs/hvae --binarize --metrics elbo,nll,au --k 100": (SHORT, FEW),
    # docs/data.md
    "python -c \"from datasets import load_dataset; load_dataset('ylecun/mnist').save_to_disk('data/mnist-hf')\"":
        (NETWORK, "downloads MNIST from the Hugging Face Hub"),
    "python train_vae.py -c configs/mnist.yaml data.name=hf data.root=data/mnist-hf data.channels=1 "
    "data.img_size=28": (SHORT, STEPS),  # on 250 MNIST digits saved as the line above saves all of them: PREPARE
    # docs/development.md
    "pip install mlflow-skinny": (NETWORK, "installs from the package index"),
    "pip install mlflow-skinny ruff": (NETWORK, "installs from the package index"),
    "python -m pytest -q -n 2": (LONG, "the whole suite, this test among it"),
    "python -m pytest -q -n 2 -m \"not slow\"": (LONG, "most of the suite"),
    "bash .ci/run": (NETWORK, "installs the requirements into a fresh virtual environment"),
    "ruff check .": (RUN, []),
    # docs/distributed.md
    "accelerate config": (PROCESSES, "asks questions about the machine's GPUs interactively"),
    "accelerate launch train_vae.py -c configs/mnist.yaml": (PROCESSES, "launches one process per GPU"),
    "accelerate launch --num_processes 4 --mixed_precision bf16 train_vae.py -c configs/mnist.yaml":
        (PROCESSES, "four processes (tests/test_training_multinode.py launches two on the CPU)"),
    "accelerate-launch train_vae.py -c configs/mnist.yaml": (PROCESSES, "launches one process per GPU"),
    "python train_vae.py -c configs/mnist.yaml train.mixed_precision=bf16": (SHORT, STEPS),
    "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)":
        (PROCESSES, "a SLURM batch script"),
    "srun bash -c 'accelerate launch --multi_gpu --num_machines \"$SLURM_NNODES\" --machine_rank \"$SLURM_NODEID\" "
    "--num_processes $((SLURM_NNODES * 4)) --main_process_ip \"$MASTER_ADDR\" --main_process_port 29500 "
    "--mixed_precision bf16 train_vae.py -c configs/celeba.yaml -e runs/celeba-2x4'":
        (PROCESSES, "a SLURM batch script: two machines of four GPUs"),
    # docs/results.md: each study's commands, their runs shortened (a study runs for minutes to an hour a row)
    "python train_vae.py -c configs/mnist.yaml -e runs/results-mnist-sigma model.likelihood=sigma train.steps=10000 "
    "train.sample_every=0 train.eval_every=0 train.save_every=0": (SHORT, STEPS),
    "python evaluate.py --exp_dir runs/results-mnist-sigma --k 100": (SHORT, FEW),
    "python sample.py --exp_dir runs/results-mnist-sigma --mode sample --n_samples 16": (RUN, []),
    "python train_vae.py -c configs/dsprites.yaml -e runs/results-dsprites-beta4 model.net=mlp model.hidden=1200 "
    "loss.beta=4 train.steps=5000 train.sample_every=0 train.eval_every=0 train.save_every=0":
        (LONG, "renders dSprites' 737,280 images before its first step"),
    "python evaluate.py --exp_dir runs/results-dsprites-beta4 --k 10 --n_test 2000 --dis_train 2000 --dis_eval 1000 "
    "--dis_variance 5000 --mig_samples 5000": (LONG, "needs the dSprites run of the line above"),
    "python sample.py --exp_dir runs/results-dsprites-beta4 --mode traverse --n_traverse 9":
        (LONG, "needs the dSprites run above"),
    "OMP_NUM_THREADS=1 python train_vae.py -c configs/binarized_mnist_vae.yaml -e runs/binarized-mnist-vae":
        (SHORT, STEPS),
    "python evaluate.py --exp_dir runs/binarized-mnist-vae --binarize --metrics elbo,nll,au --k 5000":
        (SHORT, ["--n_test", "20"]),
    "python sample.py --exp_dir runs/binarized-mnist-vae --mode sample --n_samples 64": (RUN, []),
    "OMP_NUM_THREADS=2 python train_vae.py -c configs/binarized_mnist_hvae.yaml -e runs/binarized-mnist-hvae":
        (SHORT, STEPS),
    "python evaluate.py --exp_dir runs/binarized-mnist-hvae --binarize --metrics elbo,nll,au --k 5000":
        (SHORT, ["--n_test", "20"]),
    "cp -r runs/binarized-mnist-hvae runs/binarized-mnist-hvae_iw": (LONG, "needs the hvae run above, 82 minutes"),
    "python train_vae.py -r latest -e runs/binarized-mnist-hvae_iw loss.objective=iwae loss.k=10 train.steps=430000":
        (LONG, "needs the hvae run above"),
    "python evaluate.py --exp_dir runs/binarized-mnist-hvae_iw --binarize --metrics elbo,nll,au --k 5000":
        (LONG, "needs the hvae run above"),
    "bash assets/make_dsprites_study.sh": (LONG, "five dSprites runs of minutes each, and it rewrites assets/"),
    "python train_vae.py -c configs/mnist.yaml -e runs/gallery-mnist": (SHORT, STEPS),
    "python sample.py --exp_dir runs/gallery-mnist --mode sample": (RUN, []),
    "python sample.py --exp_dir runs/gallery-mnist --mode reconstruct": (RUN, []),
    "python sample.py --exp_dir runs/gallery-mnist --mode interpolate": (RUN, []),
    "python sample.py --exp_dir runs/gallery-mnist --mode traverse": (RUN, []),
    "python train_vae.py -c configs/mnist.yaml -e runs/gallery-mnist-z2 model.z_dim=2": (SHORT, STEPS),
    "python sample.py --exp_dir runs/gallery-mnist-z2 --mode visualize_latent": (RUN, []),
    "python train_vae.py -c configs/mnist_mse_vae.yaml -e runs/gallery-mnist_mse_vae train.steps=3000": (SHORT, STEPS),
    "python train_vae.py -c configs/mnist_sigma_vae.yaml -e runs/gallery-mnist_sigma_vae train.steps=3000":
        (SHORT, STEPS),
    "python sample.py --exp_dir runs/gallery-mnist_mse_vae --mode sample": (RUN, []),
    "python sample.py --exp_dir runs/gallery-mnist_mse_vae --mode reconstruct --n_samples 32": (RUN, []),
    "python sample.py --exp_dir runs/celeba-cpu --mode reconstruct --n_samples 32":
        (LONG, "needs the CelebA run of the README's gallery"),
    "for s in prior gmm two_stage; do": (LONG, "a loop over the CelebA run of the README's gallery"),
    "python sample.py --exp_dir runs/celeba-cpu --mode sample --n_samples 64 --sampler $s":
        (LONG, "needs the CelebA run of the README's gallery"),
    "done": (LONG, "the end of the loop above"),
    "python sample.py --exp_dir runs/celeba-cpu --mode interpolate --n_pairs 4 --interp slerp --sampler gmm":
        (LONG, "needs the CelebA run of the README's gallery"),
    "python sample.py --exp_dir runs/celeba-cpu --mode traverse --n_dims 8 --n_traverse 9":
        (LONG, "needs the CelebA run of the README's gallery"),
    "python evaluate.py --exp_dir runs/celeba-cpu --metrics elbo,recon,samplers":
        (LONG, "needs the CelebA run of the README's gallery"),
    # docs/runs.md
    "MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=./mlruns python train_vae.py -c configs/mnist.yaml "
    "train.log_with=tensorboard,mlflow": (SHORT, STEPS),
    "python train_vae.py -c configs/mnist.yaml -r latest": (SHORT, ["train.steps=6"]),
    "python train_vae.py -r latest -e runs/mnist-20261121-100000 train.steps=20000": (SHORT, ["train.steps=8"]),
    "python train_vae.py -r runs/mnist-20261121-100000/checkpoints/step_0005000":
        (LONG, "needs the checkpoint at step 5,000 of that run, which 5,000 steps make"),
    "python train_vae.py -c configs/mnist.yaml -e runs/mine --overwrite": (SHORT, STEPS),
    # docs/sampling-evaluation.md
    "python sample.py --mode traverse": (RUN, []),
    "python sample.py --exp_dir runs/X --mode sample --n_samples 100 --individual": (RUN, []),
    "python sample.py -c configs/mnist.yaml --weights runs/X/model.safetensors --mode reconstruct": (RUN, []),
    "python evaluate.py --exp_dir runs/X --metrics nll --k 5000 --n_test 2000": (SHORT, ["--n_test", "20"]),
    "python evaluate.py -c configs/mnist.yaml --weights runs/X/model.safetensors --binarize": (SHORT, FEW),
    "python evaluate.py --exp_dir runs/X --data_root /scratch/data":
        (SHORT, ["--data_root", str(DATA), *FEW]),  # /scratch/data is the reader's folder; here the test data's
    "accelerate launch --num_processes 4 evaluate.py --exp_dir runs/X --metrics fid":
        (PROCESSES, "four processes; FID also downloads the Inception weights"),
    "python sample.py --exp_dir runs/X --sampler gmm": (RUN, []),
    "python sample.py --exp_dir runs/X --sampler two_stage --mode interpolate --interp slerp":
        (SHORT, ["--two_stage_steps", "50"]),
    "python sample.py --exp_dir runs/X --sampler gmm --gmm_covariance diag --refit": (RUN, []),
    "python evaluate.py --exp_dir runs/X --metrics samplers":
        (SHORT, ["--two_stage_steps", "50", "--flow_steps", "50", "--flow_matching_steps", "50", *FEW]),
    "python sample.py --exp_dir runs/X --mode sample --sampler flow": (SHORT, ["--flow_steps", "50"]),
    "python sample.py --exp_dir runs/X --mode sample --sampler flow_matching --flow_matching_ode_steps 16":
        (SHORT, ["--flow_matching_steps", "50"]),
    "python -m utils.inference.export runs/X hub/mnist-vae": (RUN, []),
    "python -m utils.inference.export runs/X hub/mnist-vae --push_to_hub you/mnist-vae":
        (NETWORK, "uploads to the Hugging Face Hub"),
    "python -m utils.inference.features -c configs/mnist.yaml": (SHORT, ["--steps", "20"]),
    "python -m utils.inference.features -c configs/celeba.yaml --data_root data/celeba-10k --steps 300 --seed 0 "
    "--out FILE": (LONG, "minutes of SimCLR training on the CelebA faces"),
    "python evaluate.py --exp_dir runs/X --metrics quality --sampler gmm":
        (LONG, "needs the data set's feature network (a minute to train; tests/test_sample_quality.py runs it)"),
    # docs/results.md, the sample-quality study
    "python train_vae.py -c configs/mnist.yaml -e runs/quality-mnist-sigma_vae model.likelihood=optimal_sigma":
        (SHORT, STEPS),
    "python evaluate.py --exp_dir runs/quality-mnist-sigma_vae --metrics quality --sampler gmm":
        (LONG, "needs the feature network and the run of the line above"),
    "python evaluate.py --exp_dir runs/quality-mnist-sigma_vae --metrics recon_quality":
        (LONG, "needs the feature network and the run of the line above"),
    "python benchmarks/quality.py -c configs/mnist.yaml --features features/mnist.safetensors --n 10000":
        (LONG, "needs the feature network; tests/test_sample_quality.py scores the floor"),
    "python -m utils.inference.compare runs/quality-mnist-*": (LONG, "needs the study's evaluated runs"),
    "python -m utils.inference.compare runs/a runs/b runs/c/eval.json":
        (LONG, "needs three runs evaluated with --metrics quality (tests/test_compare.py runs it on made entries)"),
    # docs/results.md, the sharper-decoder study on the faces
    "python train_vae.py -c configs/celeba_sigma_vae_perceptual.yaml -e runs/sharp-focal "
    "data.root=../shared/data/celeba-10k data.cache=true train.steps=1000 train.batch_size=32 train.threads=1":
        (LONG, "minutes of training; decoding the 10,000 faces alone takes longer than this whole test"),
    "python evaluate.py --exp_dir runs/sharp-focal --metrics elbo,recon,recon_quality "
    "--features features/celeba.safetensors": (LONG, "needs the faces' feature network and the run above"),
    "python evaluate.py --exp_dir runs/sharp-focal --metrics quality --sampler gmm "
    "--features features/celeba.safetensors": (LONG, "needs the faces' feature network and the run above"),
    "python sample.py --exp_dir runs/sharp-focal --mode reconstruct": (LONG, "needs the CelebA run above"),
}


def without_comment(line: str) -> str:
    """``line`` up to its trailing comment: the first " # " outside quotes."""
    for m in COMMENT.finditer(line):
        try:
            shlex.split(line[:m.start()])  # an open quote raises
        except ValueError:
            continue
        return line[:m.start()]
    return line


def block_commands(block: str) -> list[str]:
    """The commands of a bash block, in order: continuation lines joined, comment lines and trailing comments
    dropped, spaces collapsed."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = without_comment(line).strip()
        if line and not line.startswith("#"):
            out.append(" ".join(line.split()))
    return out


def commands(markdown: str) -> list[str]:
    """The commands of a page's bash blocks, in order."""
    return [command for block in BASH_BLOCK.findall(markdown) for command in block_commands(block)]


def documented() -> list[tuple[str, str]]:
    """(page, command) for every command of the docs, each command once (at its first page)."""
    seen: dict[str, str] = {}
    for doc in DOCS:
        for command in commands(doc.read_text(encoding="utf-8")):
            seen.setdefault(command, doc.name)
    return [(page, command) for command, page in seen.items()]


def test_every_documented_command_is_classified_and_every_classified_one_documented():
    found = {command for _, command in documented()}
    unclassified = sorted(found - COMMANDS.keys())
    assert not unclassified, "commands in the docs that this test does not know: classify them in COMMANDS:\n" + \
        "\n".join(unclassified)
    stale = sorted(COMMANDS.keys() - found)
    assert not stale, "commands in COMMANDS that no doc shows any more: remove them:\n" + "\n".join(stale)


def test_the_extraction_joins_continuations_and_drops_comments():
    page = "text\n```bash\n# a comment line\npython a.py --x 1 \\\n  --y 2   # why\nls\n```\n```python\nnot bash\n```\n"
    assert commands(page) == ["python a.py --x 1 --y 2", "ls"]
    assert commands("```sh\nA=1 python b.py 'x # y'\n```\n```\noutput\n```\n") == ["A=1 python b.py 'x # y'"]


def test_no_documented_command_writes_into_the_committed_assets():
    """A pasted command writes into runs/ (or a folder the user names), never over the committed images and
    tables of assets/: only the scripts assets/*.sh regenerate those, and their docs say so."""
    writers = [c for _, c in documented() if re.search(r"--(save_dir|out)\s+assets/", c)]
    assert not writers, "documented commands that overwrite committed files:\n" + "\n".join(writers)


def blocks() -> list[tuple[str, list[str]]]:
    """(page:line, the block's commands not shown before) for every bash block with a command to run here; each
    block runs in a fresh folder, so that the blocks spread over pytest-xdist's workers."""
    out, seen = [], set()
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in BASH_BLOCK.finditer(text):
            new = [c for c in block_commands(m.group(1)) if c not in seen]
            seen.update(new)
            runnable = [c for c in new if COMMANDS.get(c, (None,))[0] in (RUN, SHORT)]
            if runnable:
                out.append((f"{doc.name}:{text[:m.start()].count(chr(10)) + 1}", runnable))
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """The runs the docs name, trained once with the configs the docs name: runs/X (configs/mnist.yaml, as the
    -c ... --weights commands load it) and runs/mnist-20261121-100000 (with checkpoints, for -r)."""
    require_data()
    runs = tmp_path_factory.mktemp("documented") / "runs"
    train(runs / "X", extra=["train.steps=20"])
    train(runs / "mnist-20261121-100000", extra=["train.steps=4", "train.save_every=2"])
    return runs


@pytest.fixture
def clone(tmp_path, trained, monkeypatch) -> Path:
    """A folder laid out as a clone in use, the current directory: configs/, data/MNIST (the MNIST files in
    data/, as the README asks), the runs above in runs/."""
    root = tmp_path / "clone"
    (root / "data").mkdir(parents=True)
    (root / "configs").symlink_to(REPO / "configs")
    (root / "data" / "MNIST").symlink_to(DATA / "MNIST")
    shutil.copytree(trained, root / "runs", symlinks=True)
    monkeypatch.chdir(root)
    return root


def scripts() -> dict[str, Callable[[list[str]], None]]:
    import evaluate
    import sample
    import train_vae
    from utils.inference import export, features

    return {"train_vae.py": train_vae.main, "sample.py": sample.main, "evaluate.py": evaluate.main,
            "-m utils.inference.export": export.main, "-m utils.inference.features": features.main}


def run_command(command: str, appended: list[str], monkeypatch) -> Result:
    """``command`` as a shell would run it, with ``appended`` after its arguments: its leading VAR=value
    assignments set in the environment, the scripts run in this process, ruff as a process on the repository."""
    tokens = shlex.split(command)
    while "=" in tokens[0] and re.fullmatch(r"[A-Z_]+=\S*", tokens[0]):
        monkeypatch.setenv(*tokens.pop(0).split("=", 1))
    if tokens[0] == "ruff":
        done = subprocess.run([sys.executable, "-m", "ruff", *tokens[1:], *appended], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        return Result(done.returncode, done.stdout, done.stderr)
    assert tokens[0] == "python", f"no way to run {command!r} here: classify it as not run"
    name = " ".join(tokens[1:3]) if tokens[1] == "-m" else tokens[1]
    argv = tokens[3:] if tokens[1] == "-m" else tokens[2:]
    return cli(scripts()[name], [*argv, *appended])


def last_step(run: Path) -> int:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["step"]


def _mlflow_run(clone: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient("./mlruns")
    (run,) = client.search_runs([client.get_experiment_by_name("vae-toolkit").experiment_id])
    assert client.get_metric_history(run.info.run_id, "train/loss")[-1].step == 20


def _saved_mnist(clone: Path) -> None:
    from test_data_hf import mnist_dict

    mnist_dict()[0].save_to_disk(str(clone / "data" / "mnist-hf"))


# What a command needs that a line not run here (one that needs the network) would have made, made before it runs.
PREPARE: dict[str, Callable[[Path], None]] = {
    "python train_vae.py -c configs/mnist.yaml data.name=hf data.root=data/mnist-hf data.channels=1 "
    "data.img_size=28": _saved_mnist,
}


# What a command leaves, checked after it ran (beyond its exit status 0), run in the clone folder.
CHECKS: dict[str, Callable[[Path], None]] = {
    "python train_vae.py -c configs/mnist.yaml":
        lambda c: [last_step(r) for r in c.glob("runs/mnist-2*") if r.name != "mnist-20261121-100000"] == [20]
        or pytest.fail("no new runs/mnist-<date>-<time> trained to step 20"),
    "python sample.py --exp_dir runs/X --mode sample": lambda c: (c / "runs/X/sample/samples.png").is_file()
        or pytest.fail("no runs/X/sample/samples.png"),
    "python evaluate.py --exp_dir runs/X": lambda c: "elbo" in json.loads((c / "runs/X/eval.json").read_text())
        or pytest.fail("no ELBO in runs/X/eval.json"),
    "MLFLOW_ALLOW_FILE_STORE=true MLFLOW_TRACKING_URI=./mlruns python train_vae.py -c configs/mnist.yaml "
    "train.log_with=tensorboard,mlflow": _mlflow_run,
    "python train_vae.py -c configs/mnist.yaml -r latest":
        lambda c: last_step(c / "runs/mnist-20261121-100000") == 6 or pytest.fail("not resumed to step 6"),
    "python train_vae.py -r latest -e runs/mnist-20261121-100000 train.steps=20000":
        lambda c: last_step(c / "runs/mnist-20261121-100000") == 8 or pytest.fail("not extended to step 8"),
    "python -m utils.inference.export runs/X hub/mnist-vae":
        lambda c: (c / "hub/mnist-vae/model.safetensors").is_file() or pytest.fail("nothing exported"),
    "python -m utils.inference.features -c configs/mnist.yaml":
        lambda c: (c / "features/mnist.safetensors").is_file() or pytest.fail("no features/mnist.safetensors"),
}


@pytest.mark.slow  # runs the documented commands, training included
@pytest.mark.parametrize(("where", "block"), blocks(), ids=[where for where, _ in blocks()])
def test_the_documented_commands_run(where, block, clone, monkeypatch):
    """Each runnable command of one bash block, in order, in a fresh clone folder: exit status 0, and what
    CHECKS expects of it."""
    for command in block:
        kind, appended = COMMANDS[command]
        if command in PREPARE:
            PREPARE[command](clone)
        res = run_command(command, list(appended) if kind == SHORT else [], monkeypatch)
        assert res.returncode == 0, f"{where}: {command} exited {res.returncode}:\n{res.stderr[-3000:]}"
        if command in CHECKS:
            CHECKS[command](clone)
