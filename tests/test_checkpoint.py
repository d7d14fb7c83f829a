"""The checkpoint directory itself (SPEC §6, §7): ordering and pruning of checkpoints by
update number, also past update 10^8 where the names grow a digit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
