"""Shared fixtures: the schemas registered, a small corpus, the `datasets` cache kept in a
temporary folder, and finished runs of the real `trainrun` process. The helpers the tests
share are in helpers.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import cli, make_corpus, tiny

from trainrun.composition import prepare_hydra

# One intra-op thread for the tests and every process they start: tiny models gain nothing
# from more, and several processes each spinning 2 OpenMP threads on 2 cores slow down
# many-fold. The default-run test gives its process every core again.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# The tests send SIGINT to the processes they start. A background job of a shell script
# (`pytest ... &`) starts with SIGINT ignored, which its children would inherit, and
# trainrun keeps an ignored SIGINT ignored (docs/long-jobs.md, Signals): give them the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def _schemas() -> None:
    """The schemas in Hydra's ConfigStore, for the tests that compose with Hydra's own API
    (trainrun's commands register them themselves)."""
    prepare_hydra()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    """Keep the `datasets` cache of the tests in one temporary folder, offline."""
    cache = tmp_path_factory.getbasetemp() / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, corpus) -> Path:
    """A run of the real `trainrun` process (so with its .hydra/): TINY for 40 updates on
    the test corpus, checkpoints at updates 20 and 40. Tests that change it copy it first."""
    run = tmp_path_factory.mktemp("finished") / "run"
    offline = {"HF_DATASETS_CACHE": str(tmp_path_factory.getbasetemp() / "hf-cache"),
               "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # as _hf_cache sets them
    proc = cli(*tiny(corpus, "trainer.max_steps=40", "trainer.ckpt_every=20",
                     "trainer.eval_every=20", f"hydra.run.dir={run}"), cwd=run.parent, env=offline)
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory, corpus) -> Path:
    """A run of the real `trainrun` process with tokenizer=bpe (a small vocabulary, padded to
    320 ids like the byte tokenizer's 257: the shapes alone cannot tell them apart)."""
    run = tmp_path_factory.mktemp("bpe") / "run"
    offline = {"HF_DATASETS_CACHE": str(tmp_path_factory.getbasetemp() / "hf-cache"),
               "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    proc = cli(*tiny(corpus, "tokenizer=bpe", "tokenizer.vocab_size=320",
                     "trainer.max_steps=10", f"hydra.run.dir={run}"), cwd=run.parent, env=offline)
    assert proc.returncode == 0, proc.stderr
    return run
