"""The CUDA paths (docs/precision.md, docs/performance.md) on a real GPU: the `trainrun`
command, fp16's loss scaler skipping overflowed updates without advancing k, and
accumulation against one big batch. Marked `cuda` (scripts/gpu-check.sh runs them) and
skipped without a GPU."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli, final_weights, scalars, tiny, train
from test_accumulation import max_relative_difference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_command_trains_on_the_gpu(tmp_path, corpus):
    proc = cli(*tiny(corpus, "trainer.device=cuda", "precision=bf16", "hydra.run.dir=run"),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["steps"] == 20
    assert "device cuda:0, precision bf16" in (tmp_path / "run/train.log").read_text()


def test_fp16_overflows_are_skipped_without_advancing_k(tmp_path, corpus):
    # a loss scale of 2^40 overflows fp16's gradients: the scaler backs off, update by update
    m = train(tmp_path / "run", *tiny(corpus, "trainer.device=cuda", "precision=fp16",
                                      "precision.init_scale=1099511627776", "optimizer=adamw"))
    assert m["steps"] == 20 and m["skipped_updates"] > 0
    assert [k for k, _ in scalars(tmp_path / "run", "train/lr")] == list(range(1, 21))


def test_accumulation_equals_one_big_batch_on_the_gpu(tmp_path, corpus):
    base = tiny(corpus, "trainer.device=cuda", "trainer.deterministic=true",
                "data.packing=false", "optimizer=sgd", "optimizer.lr=0.5",
                "scheduler=constant", "trainer.max_steps=10")
    train(tmp_path / "big", *base, "data.batch_size=8")
    train(tmp_path / "acc", *base, "data.batch_size=4", "trainer.grad_accum_steps=2")
    # fp32 on TF32 tensor cores: products rounded to 10 bits, so batches of other shapes
    # round differently; SGD keeps the difference at the level of that rounding
    assert max_relative_difference(final_weights(tmp_path / "acc"),
                                   final_weights(tmp_path / "big")) < 1e-3


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def nccl_run(*args: str, cwd, nproc: int = 2):
    from test_distributed import torchrun

    proc = torchrun(*args, cwd=cwd, nproc=nproc)
    assert proc.returncode == 0, proc.stderr
    return proc


@two_gpus
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gpus_train_as_one_big_batch_and_resume_exactly(tmp_path, corpus, strategy):
    """NCCL, one GPU per rank: 2 × batch 4 equals 1 × batch 8, and a run stopped at update
    5 and resumed on both GPUs ends with the weights of the uninterrupted one (each rank
    restores its own GPU's generator: dropout on)."""
    base = tiny(corpus, "trainer.device=cuda", "trainer.deterministic=true", "precision=fp32",
                "data.packing=false", "optimizer=sgd", "optimizer.lr=0.5", "scheduler=constant",
                "trainer.max_steps=10", "trainer.ckpt_every=5", "model.dropout=0.1",
                f"trainer.strategy={strategy}")
    nccl_run(*base, "data.batch_size=4", "hydra.run.dir=two", cwd=tmp_path)
    log = (tmp_path / "two/train.log").read_text()
    assert "2 process(es)" in log and "device cuda:0" in log
    train(tmp_path / "one", *base, "data.batch_size=8", "trainer.strategy=ddp")
    assert max_relative_difference(final_weights(tmp_path / "two"),
                                   final_weights(tmp_path / "one")) < 1e-3
    import shutil

    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed/checkpoints/step-00000010")
    (tmp_path / "resumed/checkpoints/latest").write_text("step-00000005\n")
    nccl_run(f"resume={tmp_path / 'resumed'}", cwd=tmp_path)
    a, b = final_weights(tmp_path / "resumed"), final_weights(tmp_path / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)
