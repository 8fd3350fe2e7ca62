"""Config loading, overrides, and the one-line errors (exit code 2) for bad input."""

from __future__ import annotations

import pytest
import torch
import yaml

import train_vae
from conftest import DATA, REPO, cli, run_script
from utils.config import REGISTRIES, config_to_dict, load_config, reference_markdown
from utils.errors import UserError, guarded_main

MNIST = str(REPO / "configs" / "mnist.yaml")


def test_overrides_in_both_forms():
    cfg = load_config(MNIST, ["loss.beta=4", "--train.lr", "3e-4", "--model.channel_mults=[1, 2]"])
    assert cfg.loss.beta == 4.0 and isinstance(cfg.loss.beta, float)
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.channel_mults == [1, 2]
    assert cfg.model.likelihood == "bernoulli"  # from the YAML
    assert cfg.train.seed == 0  # a default


def test_mixed_precision_no_is_the_word_not_a_boolean(tmp_path):
    """YAML 1.1 reads a bare ``no`` as false; ``no`` is Accelerate's word for fp32, and what the errors advise."""
    assert load_config(MNIST, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    (tmp_path / "fp32.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "fp32.yaml").train.mixed_precision == "no"
    with pytest.raises(UserError, match="train.mixed_precision: got True"):
        load_config(MNIST, ["train.mixed_precision=yes"])


def test_sample_and_evaluate_say_accelerates_precision_has_no_effect(monkeypatch, tmp_path):
    """They compute in fp32: another precision from accelerate is a warning, a value that is none of the choices
    a one-line error before anything is read."""
    import evaluate
    import sample

    for main, script in ((sample.main, "sample.py"), (evaluate.main, "evaluate.py")):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8x")
        res = cli(main, ["--exp_dir", str(tmp_path / "nowhere")])
        assert res.returncode == 2 and "ACCELERATE_MIXED_PRECISION=fp8x" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        res = cli(main, ["--exp_dir", str(tmp_path / "nowhere")])  # then refused for the missing run, as usual
        assert f"warning: {script} computes in fp32: ACCELERATE_MIXED_PRECISION=bf16 has no effect" in res.stderr
        assert "is not a run directory" in res.stderr


def test_fp16_without_a_gpu_is_refused_not_ignored(tmp_path, capsys, real_data):
    """Accelerate trains in fp32 when asked for fp16 on a CPU, without a word; the run would say fp16."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, where fp16 is valid")
    with pytest.raises(SystemExit) as e:
        guarded_main(train_vae.main, ["-c", MNIST, "-e", str(tmp_path / "run"), f"data.root={DATA}",
                                 "train.mixed_precision=fp16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "fp16 needs a GPU" in err and "use bf16" in err
    assert not (tmp_path / "run").exists()


def test_every_shipped_config_loads():
    names = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    assert {"mnist.yaml", "mnist_beta_vae.yaml", "mnist_mmd_vae.yaml", "mnist_sigma_vae.yaml",
            "mnist_optimal_sigma_vae.yaml", "mnist_gaussian_vae.yaml", "mnist_mse_vae.yaml",
            "fashion_mnist.yaml"} <= set(names)
    for name in names:
        load_config(REPO / "configs" / name)


def test_docs_config_reference_is_current():
    assert reference_markdown() in (REPO / "docs" / "configuration.md").read_text()


# Every invalid input a user can type, with what the one-line error must name. Paths: {tmp} is a fresh folder
# holding bad.yaml (broken at line 3), list.yaml (a list, not sections), scalar.yaml (train: 5), inf.yaml (beta: .inf),
# twice.yaml (two model sections), twice_inner.yaml (beta twice in one section), a file
# 'afile', a non-empty folder 'stuff' that is not a run. A batch size that does not divide among the
# processes needs two of them: tests/test_training_loop.py::test_batch_not_divisible_by_processes.
CASES = [
    (["loss.betta=4"], ["unknown config key 'loss.betta'", "did you mean 'loss.beta'"]),
    (["--train.stepz", "5"], ["train.stepz", "train.steps"]),
    (["optim.lr=1"], ["unknown config key 'optim.lr'"]),
    (["model.zdim=8"], ["model.zdim", "model.z_dim"]),
    (["train.steps=abc"], ["train.steps", "an integer"]),
    (["train.steps=2.5"], ["train.steps", "an integer"]),
    (["train.lr=fast"], ["train.lr", "a number"]),
    (["train.lr=.inf"], ["train.lr: got inf, expected a finite number"]),
    (["--train.grad_clip", ".nan"], ["train.grad_clip: got nan, expected a finite number"]),
    (["-c", "{tmp}/inf.yaml"], ["loss.beta: got inf, expected a finite number"]),
    (["-c", "{tmp}/twice.yaml"], ["key 'model' appears twice, at lines 1 and 5", "merge them into one"]),
    (["-c", "{tmp}/twice_inner.yaml"], ["key 'beta' appears twice, at lines 2 and 3"]),
    (["loss.mmd_weight=10"], ["loss.mmd_weight=10 has no effect with loss.regulariser=kl",
                              "set loss.regulariser=mmd"]),
    (["loss.regulariser=mmd"], ["loss.regulariser=mmd needs loss.mmd_weight > 0"]),
    (["loss.regulariser=tc"], ["loss.regulariser", "one of kl, none, mmd"]),
    (["model.prior=gmm"], ["model.prior", "one of normal, vamp"]),
    (["loss.objective=vae"], ["loss.objective", "one of elbo, iwae"]),
    (["loss.k=5"], ["loss.k=5 is used only by loss.objective=iwae"]),
    (["loss.objective=iwae", "loss.regulariser=mmd", "loss.mmd_weight=1"],
     ["loss.objective=iwae", "has no place for loss.regulariser=mmd"]),
    (["train.lr_schedule=linear"], ["train.lr_schedule", "one of constant, cosine, exponential, step"]),
    (["model.activation=swish"], ["model.activation", "relu, tanh"]),
    (["model.hidden=[400, 0]"], ["model.hidden", "positive integers"]),
    (["data.download=maybe"], ["data.download", "true or false"]),
    (["loss.beta=-1"], ["loss.beta", ">= 0"]),
    (["train.batch_size=0"], ["train.batch_size", ">= 1"]),
    (["model.z_dim=0"], ["model.z_dim", ">= 1"]),
    (["train.lr=0"], ["train.lr", "> 0"]),
    (["model.sigma=0"], ["model.sigma", "> 0"]),
    (["train.keep_checkpoints=-1"], ["train.keep_checkpoints", ">= 0"]),
    (["train.max_bad_steps=0"], ["train.max_bad_steps", ">= 1"]),
    (["data.test_fraction=0.9"], ["data.test_fraction", "<= 0.5"]),
    (["model.likelihood=laplace"], ["model.likelihood", "bernoulli", "optimal_sigma"]),
    (["model.net=resnet"], ["model.net", "mlp, conv"]),
    (["data.name=imagenet"], ["data.name", "mnist"]),
    (["data.channels=2"], ["data.channels", "one of 0, 1, 3"]),
    (["train.mixed_precision=fp8"], ["train.mixed_precision", "bf16"]),
    (["model.channel_mults=[1, 0]"], ["model.channel_mults", "positive integers"]),
    (["model.net=conv", "data.img_size=4"], ["model.channel_mults has 3 stride-2 layers, too many for 4 px",
                                             "use at most 2"]),
    (["data.root={tmp}/nowhere", "data.download=false"], ["MNIST not found in", "data.download=true"]),
    (["--loss.beta"], ["--loss.beta has no value"]),
    (["beta=4"], ["cannot read argument 'beta=4'"]),
    (["-c", "{tmp}/nope.yaml"], ["config file", "nope.yaml' not found"]),
    (["-c", "{tmp}/bad.yaml"], ["malformed YAML at line 3", "fix the file"]),
    (["-c", "{tmp}/list.yaml"], ["top level must be a mapping of sections"]),
    (["-c", "{tmp}/scalar.yaml"], ["config section 'train' must be a mapping"]),
    (["NO-CONFIG"], ["no config given", "-c configs/mnist.yaml"]),
    (["-c"], ["argument -c/--config: expected one argument", "--help"]),
    (["-r", "latest"], ["no usable checkpoint in", "start a new run without -r"]),
    (["-r", "{tmp}/nothing"], ["-r {tmp}/nothing: not a checkpoint"]),
    (["-r", "latest", "--overwrite"], ["pass only one of them"]),
    (["-e", "{tmp}/afile"], ["afile is a file, not a run directory"]),
    (["-e", "{tmp}/afile/run"], ["cannot write into", "Not a directory", "a folder on the path", "is a file: rename",
                                 "another folder with -e"]),
    (["-e", "{tmp}/stuff"], ["stuff is not empty and is not a run"]),
    (["-e", "{tmp}/stuff", "--overwrite"], ["stuff is not empty and is not a run"]),
]


@pytest.mark.parametrize("args, needles", CASES, ids=[" ".join(map(str, a))[:40] for a, _ in CASES])
def test_bad_input_is_one_line_exit_2(args, needles, capsys, tmp_path, real_data):
    (tmp_path / "bad.yaml").write_text("model:\n  z_dim: 4\n likelihood: [\n")
    (tmp_path / "list.yaml").write_text("- train\n- model\n")
    (tmp_path / "scalar.yaml").write_text("train: 5\n")
    (tmp_path / "inf.yaml").write_text("loss:\n  beta: .inf\n")
    (tmp_path / "twice.yaml").write_text("model:\n  z_dim: 4\ntrain:\n  steps: 3\nmodel:\n  net: conv\n")
    (tmp_path / "twice_inner.yaml").write_text("loss:\n  beta: 2\n  beta: 3\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    run = str(tmp_path / "run")
    argv = ["-c", MNIST, "-e", run, f"data.root={DATA}", "train.steps=1"]  # a case that wrongly passes stays short
    for a in args:
        if a in ("-c", "-e") and a in argv:  # the case names its own config or run directory
            j = argv.index(a)
            del argv[j:j + 2]
        if a in ("-r", "NO-CONFIG"):
            argv.remove("-c"), argv.remove(MNIST)
    argv += [a.format(tmp=tmp_path) for a in args if a != "NO-CONFIG"]
    with pytest.raises(SystemExit) as e:
        guarded_main(train_vae.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle.format(tmp=tmp_path) in err, err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "mine"


def test_dry_run_prints_the_resolved_config_and_touches_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where runs/ would be created
    guarded_main(train_vae.main, ["-c", MNIST, "loss.beta=4", "--train.lr", "3e-4", "--dry-run"])
    out = capsys.readouterr().out
    assert out.startswith("# would train into runs/mnist-")
    assert yaml.safe_load(out) == config_to_dict(load_config(MNIST, ["loss.beta=4", "train.lr=3e-4"]))
    assert list(tmp_path.iterdir()) == []


def test_config_choices_are_the_registries():
    """Every name a config accepts is a registry key and every registry key is accepted: one list per kind, and
    an entry added to a registry is a valid choice at once."""
    from utils.config import build_config

    for key, registry in REGISTRIES.items():
        section, name = key.split(".")
        for choice in registry:
            try:
                build_config({section: {name: choice}})
            except UserError as e:  # accepted as a name; only a rule of another key may refuse it
                assert "expected one of" not in str(e), (key, choice, e)
        with pytest.raises(UserError, match="expected one of"):
            build_config({section: {name: "no_such_part"}})
        registry = registry.load()
        if isinstance(registry, dict):
            registry["no_such_part"] = next(iter(registry.values()))  # another name for a real part
            try:
                assert getattr(getattr(build_config({}), section), name) != "no_such_part"
                build_config({section: {name: "no_such_part"}})
            except UserError as e:
                assert "expected one of" not in str(e), (key, e)
            finally:
                del registry["no_such_part"]
    assert set(REGISTRIES) == {"data.name", "model.net", "model.activation", "model.likelihood", "model.prior",
                               "loss.objective", "loss.regulariser", "loss.mmd_kernel", "loss.tc_estimator",
                               "loss.lpips_net", "train.lr_schedule"}


def test_debug_shows_the_traceback(tmp_path):
    proc = run_script(["train_vae.py", "-c", MNIST, "-e", str(tmp_path / "r"), "loss.betta=4", "--debug"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr


def test_cli_error_has_no_traceback(tmp_path):
    proc = run_script(["train_vae.py", "-c", MNIST, "-e", str(tmp_path / "r"), "loss.betta=4"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'loss.betta': did you mean 'loss.beta'?"]


def test_the_names_read_before_a_registry_loads_are_its_keys(tmp_path, monkeypatch):
    """Each registry's names as a config checks them before torch loads (read from the literal in its module's
    source) are the loaded registry's keys, in order; once loaded, the live registry's names count (an entry a
    test or a user adds); a registry that is no literal of names is said, not guessed."""
    from models.sampler_rules import COVARIANCES, SAMPLERS
    from utils.fields import Registry

    views = [*REGISTRIES.values(), *(Registry("models.sampler_rules", v) for v in ("SAMPLERS", "COVARIANCES"))]
    for view in views:
        assert view._read_names() == list(view.load()), view
    assert list(views[-2]) == list(SAMPLERS) and tuple(views[-1]) == COVARIANCES
    monkeypatch.setitem(SAMPLERS, "planted", SAMPLERS["gmm"])
    assert "planted" in views[-2] and "planted" not in views[-2]._read_names()
    (tmp_path / "built.py").write_text("PARTS = dict(a=1)\nNAMES = ('a', 'b')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert list(Registry("built", "NAMES")) == ["a", "b"]  # (not imported: read from the source)
    with pytest.raises(LookupError, match="no literal dict or tuple of names to PARTS"):
        list(Registry("built", "PARTS"))


def test_each_rules_class_loads_its_torch_class_which_subclasses_it():
    """A prior's, an objective's and a regulariser's registry holds its rules class (torch-free); ``load()`` gives
    the torch class, which subclasses the rules and restates none of them, so the config's checks and the model
    cannot disagree. A torch class registered directly is its own, a subclass of a part too."""
    from models.objective_rules import OBJECTIVES
    from models.prior_rules import PRIORS
    from models.regulariser_rules import REGULARISERS
    from models.regularisers import KL, Regulariser

    for registry in (OBJECTIVES, REGULARISERS, PRIORS):
        for name, rules in registry.items():
            part = rules.load()
            assert part is not rules and issubclass(part, rules), name
            assert part.load() is part and not issubclass(rules, torch.nn.Module), name
            stated = {k for c in rules.__mro__ for k in vars(c) if not k.startswith("_")} - {"load"}
            assert stated >= {"implementation", "check"} or registry is PRIORS, name
            restated = [k for k in stated if next(c for c in part.__mro__ if k in vars(c)) not in rules.__mro__]
            assert restated == [], name

    class L1(KL):
        pass

    class Plain(Regulariser):
        pass

    assert L1.load() is L1 and Plain.load() is Plain and L1.plain_kl and not Plain.plain_kl
    assert REGULARISERS["kl"].load() is KL and REGULARISERS["kl"] is not KL


def test_the_rules_modules_import_no_torch():
    """The config's rules across parts and the data sets' counts are read before torch loads."""
    res = run_script(["-c", "import sys, models.objective_rules, models.prior_rules, models.regulariser_rules, "
                            "utils.data.registry; print('torch' in sys.modules)"])
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]
