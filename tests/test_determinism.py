"""trainer.deterministic: deterministic kernels while the run lasts, restored after it; on
the CPU, where training is bit-exact already, the same weights with and without it."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import assert_identical, final_weights, tiny, train

from trainrun import runner

N = 12


def overrides(corpus, *extra: str) -> list[str]:
    # dropout: the RNG matters; padding (packing off): the loss masks matter
    return tiny(corpus, f"trainer.max_steps={N}", "trainer.ckpt_every=4", "trainer.keep_last=5",
                "model.dropout=0.1", "data.packing=false", *extra)


@pytest.fixture
def during_run(monkeypatch):
    """The global settings as the loop sees them, recorded when fit() starts."""
    seen = {}
    fit = runner.fit

    def recording_fit(*args, **kwargs):
        seen.update(algorithms=torch.are_deterministic_algorithms_enabled(),
                    benchmark=torch.backends.cudnn.benchmark,
                    workspace=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return fit(*args, **kwargs)
    monkeypatch.setattr(runner, "fit", recording_fit)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # a caller's choice
    return seen


@pytest.mark.parametrize("workspace", [None, ":16:8"], ids=["unset", "set-by-the-user"])
def test_deterministic_holds_during_the_run_and_is_restored(tmp_path, corpus, monkeypatch,
                                                           during_run, workspace):
    if workspace is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", workspace)
    assert not torch.are_deterministic_algorithms_enabled()
    m = train(tmp_path / "run", *overrides(corpus, "trainer.deterministic=true"))
    assert m["status"] == "completed" and m["steps"] == N
    assert during_run == {"algorithms": True, "benchmark": False,
                          "workspace": workspace or ":4096:8"}
    # restored for whatever this process does next
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is True
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG") == workspace
    log = (tmp_path / "run/train.log").read_text()
    assert (f"trainer.deterministic=true: torch.use_deterministic_algorithms(True), "
            f"cudnn.benchmark=False, CUBLAS_WORKSPACE_CONFIG={workspace or ':4096:8'}") in log


def test_off_changes_nothing(tmp_path, corpus, monkeypatch, during_run):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    train(tmp_path / "run", *overrides(corpus))
    assert during_run == {"algorithms": False, "benchmark": True, "workspace": None}
    assert "trainer.deterministic" not in (tmp_path / "run/train.log").read_text()


def test_on_the_cpu_the_flag_changes_no_bit_and_a_resume_may_change_it(tmp_path, corpus):
    """CPU training is bit-exact already: a run with the flag ends with the same weights as
    one without, and so does a run stopped at update 8 and resumed with the flag turned on
    (resume does not refuse a changed trainer.deterministic)."""
    plain = tmp_path / "plain"
    train(plain, *overrides(corpus))
    strict = tmp_path / "strict"
    train(strict, *overrides(corpus, "trainer.deterministic=true"))
    assert_identical(final_weights(strict), final_weights(plain))
    part = tmp_path / "part"  # `plain` as it was when step-00000008 was its newest checkpoint
    shutil.copytree(plain, part)
    shutil.rmtree(part / "checkpoints/step-00000012")
    (part / "checkpoints/latest").write_text("step-00000008\n")
    m = train(part, *overrides(corpus, f"resume={part}", "trainer.deterministic=true"))
    assert m["status"] == "completed" and m["steps"] == N
    assert "resumed from" in (part / "train.log").read_text()
    assert_identical(final_weights(part), final_weights(plain))
