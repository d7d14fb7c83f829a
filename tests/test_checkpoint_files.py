"""What a resume reads from a checkpoint is data, with real runs and real files: a pickle
planted in a sharded checkpoint runs nothing, and files that match meta.json's checksums but
are not trainrun's are refused in one line, the run directory left as it was."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import cli, tiny

from trainrun import checkpoint


class Payload:
    """Unpickled, it touches `marker`: what an attacker's file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def files(run: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """Exit 2, exactly one line on stderr, `trainrun: error: resume: ...`."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainrun: error: resume: "), proc.stderr
    return lines[0]


def plant(ckpt: Path, name: str, content: bytes) -> None:
    """Write `name` into checkpoint `ckpt` and its sha256 into meta.json, as whoever plants a
    file can."""
    (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
    (ckpt / name).write_bytes(content)
    meta = json.loads((ckpt / checkpoint.META_FILE).read_text())
    meta["sha256"][name] = hashlib.sha256(content).hexdigest()
    (ckpt / checkpoint.META_FILE).write_text(json.dumps(meta, indent=2))


def newest(run: Path) -> Path:
    return checkpoint.complete(run / "checkpoints")[-1]


@pytest.fixture
def plain(tmp_path, finished_run) -> Path:
    """A copy of the session's finished single-process run (checkpoints 20 and 40)."""
    return Path(shutil.copytree(finished_run, tmp_path / "plain"))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, corpus) -> Path:
    """A finished trainer.strategy=fsdp run of one process: checkpoints 2 and 4, each with
    sharded/ (DCP's .metadata and one shard)."""
    run = tmp_path_factory.mktemp("fsdp") / "run"
    proc = cli(*tiny(corpus, "trainer.strategy=fsdp", "trainer.max_steps=4",
                     "trainer.ckpt_every=2", "trainer.eval_every=2", f"hydra.run.dir={run}"),
               cwd=run.parent)
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture
def fsdp(tmp_path, fsdp_run) -> Path:
    return Path(shutil.copytree(fsdp_run, tmp_path / "fsdp"))


# -- a pickle planted in sharded/ --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_pickle_planted_as_sharded_metadata_runs_nothing(plain, fsdp, tmp_path, strategy):
    run = plain if strategy == "ddp" else fsdp
    marker = tmp_path / "pwned"
    plant(newest(run), "sharded/.metadata", pickle.dumps(Payload(marker)))
    before = files(run)
    proc = cli(f"resume={run}", "trainer.max_steps=41", cwd=tmp_path)
    line = one_error_line(proc)
    assert str(newest(run) / "sharded") in line
    assert not marker.exists()
    assert files(run) == before


def replace_bytes_value(ckpt: Path, fqn: str, content: bytes) -> None:
    """Make the plain value `fqn` of a sharded checkpoint read `content`: appended to its
    shard, with DCP's index (rewritten with DCP's own classes) and meta.json pointing at it."""
    shards = ckpt / "sharded"
    with open(shards / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # the genuine index, written by this test's own run
    (info,) = [s for i, s in metadata.storage_data.items() if i.fqn == fqn]
    shard = shards / info.relative_path
    info.offset, info.length = shard.stat().st_size, len(content)
    plant(ckpt, f"sharded/{info.relative_path}", shard.read_bytes() + content)
    plant(ckpt, "sharded/.metadata", pickle.dumps(metadata))


@pytest.mark.slow
def test_a_pickle_planted_as_a_sharded_plain_value_runs_nothing(fsdp, tmp_path):
    """DCP reads param_groups' values with torch.load(weights_only=False): not here."""
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(Payload(marker), payload)
    replace_bytes_value(newest(fsdp), "optimizer.param_groups.0.lr", payload.getvalue())
    before = files(fsdp)
    proc = cli(f"resume={fsdp}", "trainer.max_steps=6", cwd=tmp_path)
    line = one_error_line(proc)
    assert "optimizer.param_groups.0.lr" in line and "not a plain value" in line
    assert not marker.exists()
    assert files(fsdp) == before


@pytest.mark.slow
def test_a_genuine_sharded_checkpoint_resumes_on_one_process(fsdp, tmp_path):
    proc = cli(f"resume={fsdp}", "trainer.max_steps=6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stdout and "step-00000004" in proc.stdout
    assert json.loads((fsdp / "metrics.json").read_text())["steps"] == 6


# -- files that match meta.json but are not trainrun's, and meta.json edited by hand -----

def torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def edited_state(ckpt: Path, edit) -> bytes:
    """The checkpoint's trainer state, changed by edit(state)."""
    state = torch.load(ckpt / checkpoint.STATE_FILE, weights_only=True)
    edit(state)
    return torch_bytes(state)


def other_weights(tmp_path: Path) -> bytes:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    return (tmp_path / "other.safetensors").read_bytes()


def first_moment(state: dict) -> dict:
    return next(iter(state["optimizer"]["state"].values()))


# each: (the file, what to write into it given the checkpoint and a scratch folder, words
# of the line)
FOREIGN = {
    "state-of-another-program": (checkpoint.STATE_FILE, lambda c, t: torch_bytes({"x": 1}),
                                 "'schedule' missing"),
    "state-with-a-pickle": (checkpoint.STATE_FILE,
                            lambda c, t: torch_bytes(Payload(t / "pwned")),
                            "unsupported GLOBAL posix.system"),
    "counter-of-another-type": (checkpoint.STATE_FILE, lambda c, t: edited_state(
        c, lambda s: s["counters"].update(k="40")), "state.counters.k: str where trainrun "
                                                    "writes int"),
    "moment-of-another-shape": (checkpoint.STATE_FILE, lambda c, t: edited_state(
        c, lambda s: first_moment(s).update(exp_avg=torch.zeros(7, 3))),
        "optimizer state 'exp_avg' of shape (7, 3)"),
    "state-of-another-update": (checkpoint.STATE_FILE, lambda c, t: edited_state(
        c, lambda s: s["counters"].update(k=20)), "the state after update 20"),
    "weights-of-another-model": (checkpoint.MODEL_FILE, lambda c, t: other_weights(t),
                                 "w not in the model"),
    "weights-not-safetensors": (checkpoint.MODEL_FILE, lambda c, t: b"{}" * 8,
                                "not this model's weights"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", FOREIGN)
def test_a_file_that_matches_meta_json_but_is_not_trainruns_is_one_line(plain, tmp_path, case):
    name, content, words = FOREIGN[case]
    ckpt = newest(plain)
    plant(ckpt, name, content(ckpt, tmp_path))
    before = files(plain)
    line = one_error_line(cli(f"resume={plain}", "trainer.max_steps=41", cwd=tmp_path))
    assert str(ckpt / name) in line and words in line
    assert files(plain) == before
    assert not (tmp_path / "pwned").exists()


EDITS = {
    "max_steps-0": (("config", "trainer", "max_steps"), 0,
                    "config.trainer.max_steps: got 0 (allowed: a finite number > 0)"),
    "lr-x": (("config", "optimizer", "lr"), "x", "config.optimizer.lr: Value 'x'"),
    "step-x": (("step",), "x", "step 'x' in the checkpoint of update 40"),
    "tokenizer-5": (("tokenizer",), 5, "tokenizer: 5"),
    "threads-0": (("reproducibility", "threads"), 0,
                  "reproducibility.threads: 0, where trainrun writes a whole number from 1 to "
                  "1024"),
    "threads-x": (("reproducibility", "threads"), "2", "reproducibility.threads: '2'"),
    "reproducibility-list": (("reproducibility",), [2], "reproducibility: [2]"),
}


@pytest.mark.slow
@pytest.mark.parametrize("edit", EDITS)
def test_a_meta_json_edited_by_hand_is_one_line(plain, tmp_path, edit):
    keys, value, words = EDITS[edit]
    meta_file = newest(plain) / checkpoint.META_FILE
    meta = json.loads(meta_file.read_text())
    node = meta
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    meta_file.write_text(json.dumps(meta))
    before = files(plain)
    line = one_error_line(cli(f"resume={plain}", "trainer.max_steps=41", cwd=tmp_path))
    assert str(meta_file) in line and words in line
    assert files(plain) == before
