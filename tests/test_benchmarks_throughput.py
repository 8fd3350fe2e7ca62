"""The throughput benchmark runs end to end and prints its table (no timing is asserted)."""

from __future__ import annotations

import json

import pytest

from conftest import DATA, REPO, run_script


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
