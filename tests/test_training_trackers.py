"""Experiment trackers through Accelerate: TensorBoard and MLflow (a local file store) at once, read back; the
errors for an unknown, a missing and a failing tracker."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FAST, REPO, train, train_cli
from utils.config import load_config
from utils.errors import UserError


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    import mlflow  # noqa: F401  a test requirement (pip install mlflow-skinny): fail, never skip, without it

    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store, kept for offline use
    return uri


def train_lines(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_tensorboard_and_mlflow_get_scalars_config_and_grids(tmp_path, mlflow_store, real_data):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run-mlflow"
    train(run, extra=["train.steps=20", "train.log_every=5", "train.sample_every=10", "model.hidden=64",
                      "train.log_with=tensorboard,mlflow"])
    logged = train_lines(run)
    assert [r["step"] for r in logged] == [5, 10, 15, 20]

    client = MlflowClient(mlflow_store)
    (found,) = client.search_runs([client.get_experiment_by_name("vae-toolkit").experiment_id])
    assert found.info.run_name == run.name and found.info.status == "FINISHED"
    assert found.data.params["model.hidden"] == "[64]" and found.data.params["train.steps"] == "20"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    assert np.allclose([m.value for m in history], [r["loss"] for r in logged], rtol=1e-6)
    artifacts = Path(client.download_artifacts(found.info.run_id, "samples", str(tmp_path / "got")))
    for step in (10, 20):
        for name in (f"step_{step:07d}_samples.png", f"step_{step:07d}_recon.png"):
            assert (artifacts / name).read_bytes() == (run / "samples" / name).read_bytes()

    (events,) = {p.parent for p in (run / "tb").glob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert sorted(acc.Tags()["images"]) == ["reconstructions", "samples"]
    images = acc.Images("samples")
    assert [e.step for e in images] == [10, 20]
    with Image.open(run / "samples" / "step_0000020_samples.png") as im:
        expected = np.asarray(im.convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB")),
                          expected)
    tb_loss = [e.value for e in acc.Scalars("train/loss")]
    assert np.allclose(tb_loss, [r["loss"] for r in logged], rtol=1e-6)


def test_no_tracker_writes_no_events(tmp_path, real_data):
    run = tmp_path / "quiet"
    train(run, extra=["train.steps=2", "train.log_with=none"])
    assert (run / "model.safetensors").is_file() and not (run / "tb").exists()


def test_tracker_errors(tmp_path, monkeypatch, real_data):
    with pytest.raises(UserError, match="unknown tracker 'tensorbord'"):
        load_config(None, ["train.log_with=tensorboard,tensorbord"])
    res = train_cli(["-c", str(REPO / "configs/mnist.yaml"), "-e", str(tmp_path / "a"), *FAST,
                     "train.log_with=aim"])
    assert res.returncode == 2 and "needs the aim package" in res.stderr and "pip install aim" in res.stderr
    assert not (tmp_path / "a").exists()
    # a tracker that cannot start (MLflow refusing a file store without its opt-in): the fresh run is removed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    res = train_cli(["-c", str(REPO / "configs/mnist.yaml"), "-e", str(tmp_path / "b"), *FAST,
                     "train.log_with=mlflow", "train.steps=1"])
    assert res.returncode == 2 and "could not start" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()
