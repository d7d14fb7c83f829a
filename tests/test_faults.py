"""The fault-injection variables are read in one documented place, trainrun/faults.py."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from trainrun import faults

ROOT = Path(__file__).resolve().parents[1] / "trainrun"
VARIABLES = (faults.SAVE_FAIL_ENOSPC_AT, faults.SAVE_PAUSE, faults.BEST_PAUSE,
             faults.SIGNAL_INSIDE, faults.STREAM_STALL_AT)


def test_each_variable_is_documented_in_faults_and_named_nowhere_else():
    for name in VARIABLES:
        assert f"    {name}=" in faults.__doc__, name
        elsewhere = [p for p in ROOT.rglob("*.py")
                     if p.name != "faults.py" and name in p.read_text(encoding="utf-8")]
        assert not elsewhere, (name, elsewhere)


def test_a_full_disk_only_at_the_save_named(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.SAVE_FAIL_ENOSPC_AT, "8")
    faults.disk_full_in_save(7, tmp_path / "state")
    with pytest.raises(OSError) as raised:
        faults.disk_full_in_save(8, tmp_path / "state")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "state")


def test_signal_inside_is_a_signal_and_a_place(monkeypatch):
    monkeypatch.delenv(faults.SIGNAL_INSIDE, raising=False)
    assert faults.signal_inside() is None
    monkeypatch.setenv(faults.SIGNAL_INSIDE, "SIGTERM:datasets.load.load_dataset")
    assert faults.signal_inside() == ("SIGTERM", "datasets.load.load_dataset")
