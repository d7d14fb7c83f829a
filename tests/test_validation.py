"""The validation set (trainer.eval_sequences): the first N sequences of the validation split,
whatever the batch size or a resume, its val/loss checked against a bare PyTorch computation
over those sequences; the deprecated trainer.eval_batches; a resume that measures another set.
(The same set on 1 and 2 processes: tests/test_distributed.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import cli, config, scalars, tiny
from safetensors.torch import load_model

from trainrun import data
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.models import GPT

# The runs below read padded documents (data.packing=false), the reference reads each
# sequence alone: the same token losses, added up in another order and by kernels of other
# batch shapes, which round fp32's last bits differently. A relative 1e-6 is a few fp32 ulps
# of the mean; reading the wrong sequences moves the loss by 1e-3 or more.
RTOL = 1e-6


def reference_val_loss(model_file: Path, cfg, n: int) -> float:
    """Token-mean loss of the weights in model_file over the first n validation sequences of
    cfg's data, computed without trainrun's batching: each sequence is a document of the
    split's token file (its ids, then the end-of-document id; those with a target at
    least), cut to seq_len + 1 tokens, forwarded alone (no padding), summed in float64."""
    assert not cfg.data.packing
    val = data.load(cfg.data)["validation"]
    tokens, offsets = np.asarray(val.tokens, dtype=np.int64), np.asarray(val.offsets)
    docs = [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True) if b - a >= 2]
    assert len(docs) >= n
    model = GPT(cfg.model, ByteTokenizer.vocab_size)
    load_model(model, str(model_file))  # safetensors' own loader, which knows tied weights
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs[:n]:
            seq = torch.from_numpy(doc[: cfg.data.seq_len + 1])[None]  # (1, L)
            logits = model(seq[:, :-1])  # (1, L-1, V)
            total += F.cross_entropy(logits[0].double(), seq[0, 1:], reduction="sum").item()
            count += seq.shape[1] - 1
    return total / count


def args_without_eval(corpus: Path, *more: str) -> list[str]:
    """TINY on corpus, padded documents, without TINY's trainer.eval_sequences."""
    return [*(a for a in tiny(corpus, "data.packing=false", "data.val_fraction=0.5")
              if not a.startswith("trainer.eval_sequences=")), *more]


def meta(run: Path, step: int) -> dict:
    return json.loads((run / f"checkpoints/step-{step:08d}/meta.json").read_text())


@pytest.mark.parametrize("asked, n", [("trainer.eval_sequences=10", 10),
                                      ("trainer.eval_batches=2", 8)])
def test_a_resume_with_another_batch_size_keeps_the_validation_set(corpus, tmp_path, asked, n):
    args = args_without_eval(corpus, "trainer.max_steps=2", "trainer.eval_every=2",
                             "trainer.ckpt_every=2", "data.batch_size=4", asked)
    first = cli(*args, "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = cli("resume=run", "trainer.max_steps=4", "data.batch_size=8", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    run = tmp_path / "run"
    cfg = config(*[a for a in args if not a.startswith("trainer.eval_")])
    val = dict(scalars(run, "val/loss"))
    for step in (2, 4):  # batch 4, then batch 8: the first n sequences both times
        model_file = run / f"checkpoints/step-{step:08d}/model.safetensors"
        assert val[step] == pytest.approx(reference_val_loss(model_file, cfg, n), rel=RTOL)
    assert json.loads((run / "metrics.json").read_text())["val_loss"] == pytest.approx(
        val[4], rel=1e-6)  # TensorBoard holds float32
    assert "validation now reads" not in resumed.stdout
    assert meta(run, 2)["validation"] == meta(run, 4)["validation"]
    assert meta(run, 4)["validation"]["sequences"] == n


def test_eval_batches_is_a_deprecated_alias_and_not_given_with_eval_sequences(corpus, tmp_path):
    args = args_without_eval(corpus, "trainer.max_steps=2", "data.batch_size=4")
    proc = cli(*args, "trainer.eval_batches=3", "hydra.run.dir=alias", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = ("trainer.eval_batches=3 is deprecated: validation reads 3 x data.batch_size = 12 "
            "sequences, the same whatever the batch size; write trainer.eval_sequences=12")
    assert proc.stdout.count(line) == 1
    assert line in (tmp_path / "alias/train.log").read_text()
    assert meta(tmp_path / "alias", 2)["validation"]["sequences"] == 12
    both = cli(*args, "trainer.eval_sequences=8", "trainer.eval_batches=2",
               "hydra.run.dir=both", cwd=tmp_path)
    assert both.returncode == 2 and not (tmp_path / "both").exists()
    assert both.stderr.strip() == (
        "trainrun: error: trainer.eval_batches: 2 with trainer.eval_sequences=8; eval_batches "
        "is the deprecated form of eval_sequences; allowed: one of them, "
        "trainer.eval_sequences=N (validation sequences, whatever the batch size)")
    # the default: 320 sequences, 20 micro-batches of the default 16, as before
    assert (config().trainer.eval_sequences, config().trainer.eval_batches) == (320, None)


def test_a_resume_that_measures_another_set_starts_the_best_over(corpus, tmp_path):
    args = args_without_eval(corpus, "trainer.max_steps=4", "trainer.eval_every=2",
                             "trainer.ckpt_every=2", "trainer.eval_sequences=8",
                             "scheduler=constant", "optimizer.lr=0.03")
    first = cli(*args, "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "run"
    before = json.loads((run / "metrics.json").read_text())
    resumed = cli("resume=run", "trainer.max_steps=6", "trainer.eval_sequences=30",
                  cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (f"validation now reads 30 sequences, the checkpoint's 8: best_val_loss "
            f"{before['best_val_loss']:.4f} of update ") in resumed.stdout
    after = json.loads((run / "metrics.json").read_text())
    val = dict(scalars(run, "val/loss"))
    # the best is of the 30 sequences alone, whether or not the 8's was lower
    assert after["best_val_loss"] == pytest.approx(val[6], rel=1e-6)
    assert meta(run, 6)["validation"]["sequences"] == 30

    # under a schedule driven by val/loss the history cannot start over: refused, nothing
    # written
    plateau = [*args, "scheduler=plateau", "scheduler.warmup_ratio=null",
               "scheduler.warmup_steps=1"]
    assert cli(*plateau, "hydra.run.dir=plateau", cwd=tmp_path).returncode == 0
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "plateau").rglob("*")}
    refused = cli("resume=plateau", "trainer.max_steps=6", "trainer.eval_sequences=30",
                  cwd=tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "trainrun: error: trainer.eval_sequences: 30 validation sequences, where the "
        "checkpoint's val/loss history, which the schedule's rate depends on, is of 8; "
        "allowed: trainer.eval_sequences=8")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "plateau").rglob("*")} == files


def test_a_checkpoint_from_before_the_record_has_the_set_it_was_measured_on(corpus, tmp_path):
    """Before trainer.eval_sequences, a run validated trainer.eval_batches micro-batches of
    data.batch_size sequences per process, and meta.json recorded no set."""
    args = args_without_eval(corpus, "trainer.max_steps=2", "trainer.ckpt_every=2",
                             "data.batch_size=4", "trainer.eval_sequences=12")
    assert cli(*args, "hydra.run.dir=run", cwd=tmp_path).returncode == 0
    path = tmp_path / "run/checkpoints/step-00000002/meta.json"
    old = json.loads(path.read_text())
    del old["validation"]
    old["config"]["trainer"]["eval_batches"] = 3  # 3 x 4 x 1 process: the same 12
    del old["config"]["trainer"]["eval_sequences"]
    path.write_text(json.dumps(old))
    same = cli("resume=run", "trainer.max_steps=3", cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    assert "validation now reads" not in same.stdout
    assert meta(tmp_path / "run", 3)["validation"]["sequences"] == 12
    # the best goes on over the same set: the lower of updates 2 and 3
    val = dict(scalars(tmp_path / "run", "val/loss"))
    best = json.loads((tmp_path / "run/metrics.json").read_text())["best_val_loss"]
    assert best == pytest.approx(min(val[2], val[3]), rel=1e-6)
