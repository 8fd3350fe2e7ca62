"""The training benchmarks run end to end and print their tables (no timing is asserted); their arithmetic
(the work of a step, the precision verdict) against figures derived by hand."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import DATA, REPO, run_script

pytestmark = pytest.mark.slow  # the benchmarks, which train


def test_throughput_benchmark_prints_its_table(tmp_path, real_data):
    out = tmp_path / "bench.json"
    proc = run_script([str(REPO / "benchmarks" / "throughput.py"), "--steps", "12", "--warmup", "4", "--window", "4",
                       "--repeats", "1", "--sample_n", "200", "--sample_batch", "100", "--json", str(out),
                       "--precisions", "no,bf16",
                       f"data.root={DATA}", "model.base_width=8", "train.batch_size=32"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("device: cpu") and "config: bench_mnist.yaml" in lines[0]
    assert "| loop | steps/s | images/s | peak memory (MB) |" in lines
    for loop in ("trainer fp32", "plain loop fp32", "trainer bf16", "plain loop bf16"):
        assert any(line.startswith(f"| {loop} |") for line in lines)
    assert any(line.startswith("sampling, 200 prior samples: decoder") for line in lines)
    result = json.loads(out.read_text())
    trainer, plain = result["trainer fp32"], result["plain loop fp32"]
    assert trainer["steps_per_s"] > 0 and plain["steps_per_s"] > 0
    assert result["ratio"] == pytest.approx(trainer["steps_per_s"] / plain["steps_per_s"])
    assert trainer["images_per_s"] == trainer["steps_per_s"] * 32 and len(trainer["runs"]) == 1
    assert f"| trainer / plain | {result['ratio']:.3f} | | |" in lines
    # achieved GFLOP/s: the step's counted work times its speed, against the ceilings measured in the run
    gflop, ceilings = result["step_gflop"], result["ceilings_gflops"]
    assert 0 < gflop < 1 and ceilings["fp32"] > 0 and ceilings["bf16"] > 0
    bf16 = result["trainer bf16"]["steps_per_s"]
    assert (f"trainer bf16: {bf16 / trainer['steps_per_s']:.2f}x the trainer fp32 steps/s; {gflop * bf16:.0f} "
            f"GFLOP/s achieved ({gflop:.2f} GFLOP a step)") in proc.stdout


def test_step_profile_counts_the_work_and_groups_the_operators(real_data):
    proc = run_script([str(REPO / "benchmarks" / "step_profile.py"), "--steps", "2", f"data.root={DATA}",
                       "model.base_width=8", "train.batch_size=32"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "matrix-product ceiling (1024²): fp32" in out and "| where | ms a step | share |" in out
    # every operator lands in one group: the shares add up to the whole step
    shares = [int(line.split("|")[3].strip(" %")) for line in out.splitlines()
              if line.startswith("| ") and line.endswith(" % |")]
    assert "| convolution |" in out and 95 <= sum(shares) <= 105


def test_step_flops_are_those_of_the_linear_layers_by_hand(real_data):
    """An MLP's step is its matrix products: 2·B·in·out each forward, each weight gradient, and each input
    gradient except the first layer's (the image needs none)."""
    import torch.nn as nn

    sys.path.insert(0, str(REPO / "benchmarks"))
    from step_profile import _model, step_flops

    overrides = [f"data.root={DATA}", "train.batch_size=32"]
    _, vae, *_ = _model(str(REPO / "configs" / "mnist.yaml"), overrides)
    layers = [(m.in_features, m.out_features) for m in vae.modules() if isinstance(m, nn.Linear)]
    assert layers[0] == (784, 400)
    work = sum(i * o for i, o in layers)
    assert step_flops(str(REPO / "configs" / "mnist.yaml"), overrides) == 2 * 32 * (3 * work - 784 * 400)


def test_precision_verdict_by_hand():
    """Means and sample standard deviations over seeds; bf16 matches where |Δ mean| ≤ the larger sd."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from precision import summarise

    def run(family, precision, seed, loss, speed):
        return {"family": family, "precision": precision, "seed": seed, "steps": 10, "steps_per_s": speed,
                "neg_bound": loss, "train_s": 1.0}

    runs = [run("vae", "no", 0, 100.0, 10.0), run("vae", "no", 1, 102.0, 12.0),
            run("vae", "bf16", 0, 101.0, 20.0), run("vae", "bf16", 1, 104.0, 30.0),
            run("iwae", "no", 0, 90.0, 5.0), run("iwae", "no", 1, 90.5, 5.0),
            run("iwae", "bf16", 0, 93.0, 5.0), run("iwae", "bf16", 1, 93.5, 5.0)]
    vae, iwae = summarise(runs, ["vae", "iwae"])
    assert vae["no"]["mean"] == 101.0 and vae["bf16"]["mean"] == 102.5
    assert vae["no"]["sd"] == pytest.approx(2 ** 0.5) and vae["bf16"]["sd"] == pytest.approx(4.5 ** 0.5)
    assert vae["speedup"] == pytest.approx(25.0 / 11.0) and vae["delta"] == 1.5 and vae["matches"]
    assert iwae["delta"] == 3.0 and not iwae["matches"]  # 3 nats apart, seeds within 0.35


def test_precision_benchmark_trains_and_scores_both_precisions(tmp_path, real_data):
    out = tmp_path / "precision.json"
    proc = run_script([str(REPO / "benchmarks" / "precision.py"), "--data_root", str(DATA), "--families", "vae",
                       "--seeds", "1", "--scale", "0.04", "--out", str(tmp_path / "runs"), "--json", str(out)],
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert sorted(r["precision"] for r in result["runs"]) == ["bf16", "no"]
    assert all(r["steps"] == 24 and r["steps_per_s"] > 0 and 50 < r["neg_bound"] < 600 for r in result["runs"])
    row = result["rows"][0]
    assert f"| vae (MLP 784-400-16, Bernoulli) | 24 | {row['no']['steps_per_s']:.1f} |" in proc.stdout
    bad = run_script([str(REPO / "benchmarks" / "precision.py"), "--families", "vea"])
    assert bad.returncode != 0 and "unknown family 'vea'" in bad.stderr
