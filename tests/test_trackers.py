"""The trackers besides TensorBoard (docs/outputs.md, Trackers), with the real packages in
their offline modes: each receives what TensorBoard receives, read back with the tracker's
own reader and compared step by step with the event files; a resume continues the same
tracker run; a tracker that fails changes neither the weights nor the exit status; and the
`trackers` key's bad input. MFU: the figure for a known GPU, and none on the CPU."""

from __future__ import annotations

import json
import os
import sqlite3
import struct
from pathlib import Path

import pytest
import torch
from helpers import assert_identical, cli, config, final_weights, scalars, tiny, train

from trainrun import flops
from trainrun.errors import ConfigError

TAGS = ("train/lr", "train/loss", "train/grad_norm", "train/clip_coef", "train/tokens_per_sec",
        "train/skipped_updates", "val/loss")


def tracked(corpus: Path, name: str, *overrides: str) -> list[str]:
    return tiny(corpus, f"trackers=[tensorboard,{name}]", "scheduler=constant", *overrides)


def assert_same_as_tensorboard(run_dir: Path, history: dict[str, list[tuple[int, float]]]):
    """Every TensorBoard tag's (step, value) pairs, in the tracker's history too, in order
    (TensorBoard keeps float32: compared to float32's precision)."""
    for tag in TAGS:
        tb = scalars(run_dir, tag)
        assert tb, tag
        got = history[tag]
        assert [s for s, _ in got] == [s for s, _ in tb], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in tb], rel=1e-6), tag


# MLflow ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One local MLflow store for the module: creating its database takes seconds."""
    pytest.importorskip("mlflow")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def mlflow_history(store: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    return {tag: sorted((m.step, m.value) for m in client.get_metric_history(run_id, tag))
            for tag in TAGS}


def test_mlflow_receives_what_tensorboard_receives(corpus, tmp_path, monkeypatch, mlflow_store):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    summary = train(tmp_path / "run", *tracked(corpus, "mlflow"))
    run_id = json.loads((tmp_path / "run/trackers.json").read_text())["mlflow"]
    assert_same_as_tensorboard(tmp_path / "run", mlflow_history(mlflow_store, run_id))
    run = MlflowClient(tracking_uri=mlflow_store).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == str(config(*tracked(corpus, "mlflow")).optimizer.lr)
    assert run.data.tags["trainrun.run_dir"] == str(tmp_path / "run")
    assert run.data.metrics["summary/val_loss"] == pytest.approx(summary["val_loss"])


def test_mlflow_resume_continues_the_same_run(corpus, tmp_path, monkeypatch, mlflow_store):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_store)
    run_dir = tmp_path / "run"
    train(run_dir, *tracked(corpus, "mlflow", "trainer.max_steps=10"))
    first = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    train(run_dir, *tracked(corpus, "mlflow", "trainer.max_steps=20", f"resume={run_dir}"))
    assert json.loads((run_dir / "trackers.json").read_text())["mlflow"] == first
    history = mlflow_history(mlflow_store, first)
    assert [s for s, _ in history["train/lr"]] == list(range(1, 21))
    assert_same_as_tensorboard(run_dir, history)
    runs = MlflowClient(tracking_uri=mlflow_store).search_runs(
        [MlflowClient(tracking_uri=mlflow_store).get_run(first).info.experiment_id],
        f"tags.`trainrun.run_dir` = '{run_dir}'")
    assert [r.info.run_id for r in runs] == [first]


def test_an_unreachable_mlflow_changes_neither_weights_nor_exit_status(corpus, tmp_path):
    pytest.importorskip("mlflow")
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # the discard port: refused
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    plain = cli(*tiny(corpus, "scheduler=constant", "hydra.run.dir=plain"), cwd=tmp_path)
    failing = cli(*tracked(corpus, "mlflow", "hydra.run.dir=failing"), cwd=tmp_path, env=env)
    assert plain.returncode == failing.returncode == 0, failing.stderr
    log = (tmp_path / "failing/train.log").read_text().splitlines()
    warnings = [line for line in log if "tracker mlflow" in line]
    assert len(warnings) == 1 and "training goes on" in warnings[0], failing.stdout
    assert_identical(final_weights(tmp_path / "plain"), final_weights(tmp_path / "failing"))
    assert scalars(tmp_path / "failing", "train/loss") == scalars(tmp_path / "plain", "train/loss")
    assert not (tmp_path / "failing/trackers.json").exists()


# Weights & Biases -----------------------------------------------------------------------

def wandb_records(run_file: Path):
    """The records of an offline W&B run's .wandb file: W&B's transaction log, LevelDB's
    log format (a 7-byte header `:W&B` + magic + version, then 32 KiB blocks of chunks with
    a CRC32, a little-endian length and a type: full, first, middle, last), each record one
    wandb.proto Record message."""
    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header: padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:  # zero padding at the end of the file
            break
        pending += chunk
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(folder: Path) -> tuple[set[str], dict[str, list[tuple[int, float]]]]:
    """The run ids and the (step, value) history by key of every offline run under folder
    (a resumed run writes a second offline folder of the same id)."""
    ids, history = set(), {}
    for run_file in sorted(folder.rglob("run-*.wandb")):
        for record in wandb_records(run_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in record.history.item}
                for key, value in row.items():
                    if key in TAGS:
                        history.setdefault(key, []).append((row["_step"], value))
    return ids, history


@pytest.fixture
def wandb_dir(tmp_path, monkeypatch) -> Path:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is trainrun's default
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path / "wandb_dir"


def test_wandb_receives_what_tensorboard_receives_offline(corpus, tmp_path, wandb_dir):
    train(tmp_path / "run", *tracked(corpus, "wandb"))
    run_id = json.loads((tmp_path / "run/trackers.json").read_text())["wandb"]
    ids, history = wandb_history(wandb_dir)
    assert ids == {run_id}
    assert_same_as_tensorboard(tmp_path / "run", history)
    log = (tmp_path / "run/train.log").read_text()
    assert f"offline run {run_id} in " in log and "wandb sync " in log


def test_wandb_resume_continues_the_same_run(corpus, tmp_path, wandb_dir):
    run_dir = tmp_path / "run"
    train(run_dir, *tracked(corpus, "wandb", "trainer.max_steps=10"))
    train(run_dir, *tracked(corpus, "wandb", "trainer.max_steps=20", f"resume={run_dir}"))
    ids, history = wandb_history(wandb_dir)
    assert ids == {json.loads((run_dir / "trackers.json").read_text())["wandb"]}
    assert [s for s, _ in history["train/lr"]] == list(range(1, 21))
    assert_same_as_tensorboard(run_dir, history)


def test_a_failing_wandb_changes_neither_weights_nor_exit_status(corpus, tmp_path):
    pytest.importorskip("wandb")
    plain = cli(*tiny(corpus, "scheduler=constant", "hydra.run.dir=plain"), cwd=tmp_path)
    failing = cli(*tracked(corpus, "wandb", "hydra.run.dir=failing"), cwd=tmp_path,
                  env={"WANDB_MODE": "no-such-mode", "WANDB_DIR": str(tmp_path)})
    assert plain.returncode == failing.returncode == 0, failing.stderr
    log = (tmp_path / "failing/train.log").read_text().splitlines()
    warnings = [line for line in log if "tracker wandb" in line]
    assert len(warnings) == 1 and "training goes on" in warnings[0], failing.stdout
    assert_identical(final_weights(tmp_path / "plain"), final_weights(tmp_path / "failing"))


# trackio --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trackio_dir(tmp_path_factory) -> Path:
    """trackio's folder, fixed when trackio is first imported (TRACKIO_DIR): a test-local
    one, unless this process imported trackio earlier."""
    os.environ.setdefault("TRACKIO_DIR", str(tmp_path_factory.mktemp("trackio")))
    pytest.importorskip("trackio")
    from trackio.utils import TRACKIO_DIR

    return Path(TRACKIO_DIR)


def trackio_history(folder: Path, project: str, run: str):
    """(run ids, {tag: [(step, value)]}) of `run` in the project's SQLite database, read
    with sqlite3 alone."""
    with sqlite3.connect(folder / f"{project}.db") as db:
        rows = db.execute("SELECT run_id, step, metrics FROM metrics WHERE run_name = ? "
                          "ORDER BY id", (run,)).fetchall()
    history = {}
    for _, step, values in rows:
        for key, value in json.loads(values).items():
            if key in TAGS:
                history.setdefault(key, []).append((step, value))
    return {run_id for run_id, _, _ in rows}, history


def test_trackio_receives_what_tensorboard_receives(corpus, tmp_path, monkeypatch, trackio_dir):
    monkeypatch.setenv("TRACKIO_PROJECT", "receives")
    train(tmp_path / "run", *tracked(corpus, "trackio"))
    name = json.loads((tmp_path / "run/trackers.json").read_text())["trackio"]
    assert name == str(tmp_path / "run")
    ids, history = trackio_history(trackio_dir, "receives", name)
    assert len(ids) == 1
    assert_same_as_tensorboard(tmp_path / "run", history)


def test_trackio_resume_continues_the_same_run(corpus, tmp_path, monkeypatch, trackio_dir):
    monkeypatch.setenv("TRACKIO_PROJECT", "resumes")
    run_dir = tmp_path / "run"
    train(run_dir, *tracked(corpus, "trackio", "trainer.max_steps=10"))
    train(run_dir, *tracked(corpus, "trackio", "trainer.max_steps=20", f"resume={run_dir}"))
    ids, history = trackio_history(trackio_dir, "resumes", str(run_dir))
    assert len(ids) == 1
    assert [s for s, _ in history["train/lr"]] == list(range(1, 21))
    assert_same_as_tensorboard(run_dir, history)


# the key --------------------------------------------------------------------------------

def test_tensorboard_alone_is_the_default_and_writes_no_trackers_json(corpus, tmp_path):
    assert config(*tiny(corpus)).trackers == ["tensorboard"]
    train(tmp_path / "run", *tiny(corpus, "trainer.max_steps=2"))
    assert not (tmp_path / "run/trackers.json").exists()


@pytest.mark.parametrize(("trackers", "message"), [
    ("[tensorboard,neptune]", "unknown tracker 'neptune'; allowed: tensorboard, mlflow"),
    ("[mlflow]", "leaves out tensorboard, the run's record"),
    ("[tensorboard,tensorboard]", "names a tracker twice"),
])
def test_bad_trackers_are_refused_in_one_line_naming_the_key(corpus, tmp_path, trackers, message):
    proc = cli(*tiny(corpus, f"trackers={trackers}", "hydra.run.dir=run"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("trainrun: error: trackers: ") and message in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_tracker_not_installed_names_its_extra(monkeypatch):
    """A tracker whose package is absent (as in an environment without its extra): the check
    looks the package up without importing it."""
    from trainrun.trackers import TRACKERS, check

    absent = type("Absent", (), {"name": "absent", "package": "trainrun_no_such_package"})
    monkeypatch.setitem(TRACKERS, "absent", absent)
    monkeypatch.setattr("trainrun.trackers.NAMES", ("tensorboard", *TRACKERS))
    with pytest.raises(ConfigError) as error:
        check("trackers", ["tensorboard", "absent"])
    assert str(error.value) == ("trackers: absent is not installed; allowed: pip install "
                                "'trainrun[absent]'")


# MFU ------------------------------------------------------------------------------------

def test_mfu_is_tokens_times_flops_over_the_peak_of_all_devices():
    peak = flops.peak_of("NVIDIA H100 80GB HBM3", "bf16")
    assert peak == 989.4e12
    # 100k tokens/s at 6 GFLOP per token on two H100s: 6e14 / 1.9788e15
    assert flops.mfu(1e5, 6e9, peak, processes=2) == pytest.approx(6e14 / (2 * 989.4e12))
    assert flops.mfu(1e5, 6e9, flops.peak_of("NVIDIA H100 PCIe", "bf16")) == \
        pytest.approx(6e14 / 756.5e12)
    assert flops.peak_of("Some Other GPU", "bf16") is None
    assert flops.mfu(1e5, 6e9, None) is None
    assert flops.peak_flops(torch.device("cpu"), "fp32") is None


def test_no_mfu_on_the_cpu(corpus, tmp_path):
    train(tmp_path / "run", *tiny(corpus, "trainer.max_steps=5"))
    assert scalars(tmp_path / "run", "train/tokens_per_sec")
    assert scalars(tmp_path / "run", "train/mfu") == []
    assert "| mfu " not in (tmp_path / "run/train.log").read_text()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mfu_on_the_gpu_is_tokens_per_sec_times_flops_over_the_peak(corpus, tmp_path):
    train(tmp_path / "run", *tiny(corpus, "trainer.device=cuda", "precision=bf16"))
    device = torch.device("cuda")
    peak = flops.peak_flops(device, "bf16")
    if peak is None:
        pytest.skip(f"{torch.cuda.get_device_name(device)} is not in trainrun.flops.PEAKS")
    per_token = config(*tiny(corpus)).model.flops_per_token(257, 32)
    mfu, tps = scalars(tmp_path / "run", "train/mfu"), scalars(tmp_path / "run",
                                                                "train/tokens_per_sec")
    assert [s for s, _ in mfu] == [s for s, _ in tps]
    for (_, m), (_, t) in zip(mfu, tps, strict=True):
        assert m == pytest.approx(t * per_token / peak, rel=1e-5)
