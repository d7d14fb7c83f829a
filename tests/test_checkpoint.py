"""The checkpoint directory itself (docs/long-jobs.md, Checkpoints): ordering and pruning of
checkpoints by update number, also past update 10^8 where the names grow a digit; a disk
that fills up during a save, with the failure injected where each writer reports it."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from trainrun import checkpoint, resume

PAST_1E8 = [99_999_998, 99_999_999, 100_000_000, 100_000_001]


def save(root: Path, k: int, keep_last: int) -> Path:
    model = torch.nn.Linear(2, 2)
    return checkpoint.save(root, k, model, {"k": k}, {}, keep_last)


def test_names_keep_eight_digits_and_grow_past_them():
    assert checkpoint.step_name(12) == "step-00000012"
    assert checkpoint.step_name(99_999_999) == "step-99999999"
    assert checkpoint.step_name(100_000_000) == "step-100000000"
    assert checkpoint.step_name(12_345_678_901) == "step-12345678901"


def test_checkpoints_are_ordered_by_update_number(tmp_path):
    numbers = [7, 100_000_001, 12, 99_999_999, 100_000_000, 1_000_000_000, 8]
    for k in numbers:
        (tmp_path / checkpoint.step_name(k)).mkdir()
    (tmp_path / "step-notanumber").mkdir()  # not a checkpoint name: not listed
    (tmp_path / f".tmp-{checkpoint.step_name(5)}-123").mkdir()
    listed = checkpoint.complete(tmp_path)
    assert [checkpoint.step_number(p) for p in listed] == sorted(numbers)
    assert [p.name for p in listed] == [checkpoint.step_name(k) for k in sorted(numbers)]


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_saving_past_1e8_keeps_the_newest(tmp_path, keep_last):
    """Each save past 10^8 stays: the oldest go, by number, and `latest` names the newest."""
    root = tmp_path / "checkpoints"
    for k in PAST_1E8:
        path = save(root, k, keep_last)
        assert path.is_dir() and checkpoint.verify(path) is None
        assert (root / "latest").read_text().strip() == checkpoint.step_name(k)
    kept = [p.name for p in checkpoint.complete(root)]
    assert kept == [checkpoint.step_name(k) for k in PAST_1E8[-keep_last:]]
    newest, damaged = resume.find(tmp_path)  # what `trainrun resume=` continues from
    assert newest == root / "step-100000001" and damaged == {}
    assert checkpoint.read_meta(newest)["step"] == 100_000_001


def test_resume_falls_back_past_1e8_by_number(tmp_path):
    """A damaged newest checkpoint: the one before it by number is used, not by name."""
    root = tmp_path / "checkpoints"
    for k in PAST_1E8:
        save(root, k, keep_last=10)
    (root / "step-100000001" / checkpoint.STATE_FILE).write_bytes(b"truncated")
    found, damaged = resume.find(tmp_path)
    assert found == root / "step-100000000"
    assert list(damaged) == [root / "step-100000001"]


# --- a full disk during a save -------------------------------------------------------------

def fill_disk_in_weights(monkeypatch, code=errno.ENOSPC):
    """safetensors reports a failed write as SafetensorError, naming Rust's `os error N`."""
    def save_model(model, filename, *args, **kwargs):
        Path(filename).write_bytes(b"partial")
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} "
                              f"(os error {code})")
    monkeypatch.setattr(checkpoint, "save_model", save_model)


def fill_disk_in_state(monkeypatch, code=errno.ENOSPC):
    """torch.save replaces the OSError of its write with a RuntimeError raised from its
    zip writer's clean-up (seen on a real full tmpfs)."""
    def save(obj, f, *args, **kwargs):
        f.write(b"partial")
        try:
            raise OSError(code, os.strerror(code))
        finally:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(torch, "save", save)


def fill_disk_after_rename(monkeypatch, code=errno.ENOSPC):
    """The disk fills up after the checkpoint is in place, before `latest` names it."""
    from trainrun import rundir

    fsync = rundir.fsync

    def failing(path):
        if path.name == "checkpoints":
            raise OSError(code, os.strerror(code), str(path))
        fsync(path)
    monkeypatch.setattr(rundir, "fsync", failing)


def fill_disk_by_hook(monkeypatch, code=errno.ENOSPC):
    monkeypatch.setenv("TRAINRUN_SAVE_FAIL_ENOSPC_AT", "8")


FILL = {"weights": fill_disk_in_weights, "state": fill_disk_in_state,
        "after-rename": fill_disk_after_rename, "hook": fill_disk_by_hook}


def kib(path: Path) -> str:
    return f"{sum(os.path.getsize(f) for f in path.iterdir()) / 1024:.1f} KiB"


@pytest.mark.parametrize("where, code", [
    (where, code) for where in FILL for code in (errno.ENOSPC, errno.EDQUOT)
    if where != "hook" or code == errno.ENOSPC])  # the hook injects ENOSPC
def test_a_full_disk_leaves_the_previous_checkpoint_and_nothing_else(tmp_path, monkeypatch,
                                                                      where, code):
    root = tmp_path / "checkpoints"
    save(root, 4, keep_last=3)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    FILL[where](monkeypatch, code)
    with pytest.raises(checkpoint.NoSpace) as err:
        save(root, 8, keep_last=3)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before  # step-00000004 and `latest` untouched, no leftovers
    assert [p.name for p in root.iterdir()] == sorted(["latest", "step-00000004"])
    assert err.value.previous == root / "step-00000004"
    reason = os.strerror(code)
    expected = (f"{reason[0].lower()}{reason[1:]} while saving checkpoint step-00000008 (update "
                f"8) in {root}; it needs about {kib(root / 'step-00000004')} (the size of "
                f"step-00000004), FREE free; the previous checkpoint step-00000004 is intact "
                f"and checkpoints/latest names it")
    free = r"[0-9.]+ (B|KiB|MiB|GiB)"  # whatever the machine has left
    assert re.fullmatch(re.escape(expected).replace("FREE", free), str(err.value)), err.value
    monkeypatch.undo()
    assert save(root, 8, keep_last=3).is_dir()  # space again: the save goes through
    assert (root / "latest").read_text() == "step-00000008\n"


def test_a_full_disk_at_the_first_save_estimates_from_the_tensors(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    model = torch.nn.Linear(256, 256)  # 65,792 float32 numbers in the weights and as many
    state = {"optimizer": {"exp_avg": torch.zeros(256, 256), "step": 3}}  # + 65,536
    fill_disk_in_state(monkeypatch)
    with pytest.raises(checkpoint.NoSpace) as err:
        checkpoint.save(root, 8, model, state, {}, keep_last=3)
    assert err.value.previous is None
    assert f"it needs about {(65_792 + 65_536) * 4 / 1024:.1f} KiB (its tensors alone)" in str(
        err.value)
    assert str(err.value).endswith("; there is no earlier checkpoint")
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("error", [
    OSError(errno.EACCES, "Permission denied"),
    SafetensorError("Error while serializing: invalid header"),
    SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
], ids=["EACCES", "safetensors-not-io", "safetensors-EACCES", "torch-not-io"])
def test_other_write_errors_are_not_a_full_disk(tmp_path, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(checkpoint, "save_model", fail)
    with pytest.raises(type(error)) as err:
        save(tmp_path / "checkpoints", 8, keep_last=3)
    assert err.value is error
