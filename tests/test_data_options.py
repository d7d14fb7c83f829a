"""Data options at the edges: several files as a list, a comma-separated value, a directory,
a batch larger than the data, and a hub that cannot be reached (one line each, fast)."""

from __future__ import annotations

import time

import pytest
from helpers import cli, config, make_corpus, tiny

from trainrun import data
from trainrun.errors import ConfigError


def test_data_files_takes_a_list(tmp_path):
    a = make_corpus(tmp_path / "a.txt", n_docs=30, seed=1)
    b = make_corpus(tmp_path / "b.txt", n_docs=50, seed=2)
    cfg = config(*tiny(a), f"data.files=[{a},{b}]")
    assert cfg.data.paths() == [str(a), str(b)]
    docs = cfg.data.splits()
    assert len(docs["train"]) + len(docs["validation"]) == 80


def test_a_comma_separated_value_is_one_line_that_shows_the_list(tmp_path):
    a, b = make_corpus(tmp_path / "a.txt"), make_corpus(tmp_path / "b.txt")
    proc = cli(*tiny(a), f"data.files={a},{b}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("trainrun: error: data.files: ")
    assert f"data.files='[{a},{b}]'" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_a_directory_is_refused_with_a_glob(tmp_path):
    make_corpus(tmp_path / "a.txt")
    with pytest.raises(ConfigError) as err:
        config(*tiny(tmp_path))
    assert err.value.key == "data.files" and "is a directory" in err.value.message
    assert f"data.files='{tmp_path}/*.txt'" in err.value.message


def test_max_documents_caps_each_split():
    cfg = config("data.max_documents=7")
    docs = cfg.data.splits()
    assert len(docs["train"]) == 7 and len(docs["validation"]) == 7
    full = config().data.splits()
    assert list(docs["train"]["text"]) == list(full["train"]["text"][:7])
    with pytest.raises(ConfigError, match="data.max_documents"):
        config("data.max_documents=0")


def test_a_batch_larger_than_the_data_is_one_line_before_the_run_directory(corpus, tmp_path):
    proc = cli(*tiny(corpus, "data.batch_size=5000"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("trainrun: error: data.batch_size: 5000 exceeds the ")
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_hub_fails_fast_in_one_line(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    cfg = config("data=hf", "data.path=someone/no-such-data")
    began = time.monotonic()
    with pytest.raises(ConfigError) as err:
        data.load(cfg.data)
    assert time.monotonic() - began < 10
    assert err.value.key == "data.path" and "cannot be reached" in err.value.message
    assert "\n" not in err.value.message
