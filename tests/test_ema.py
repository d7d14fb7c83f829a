"""The exponential moving average of the weights (trainer.ema_decay; docs/long-jobs.md, EMA of
the weights): against the formula computed here in float64 from every update's saved raw
weights, unmoved by skipped updates, bit-exact on resume, validated as val/loss_ema, and
used by the commands after training with --weights ema."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_identical, cli, config, final_weights, scalars, tiny, train, weights
from test_after import exits_2, one_line
from test_resume import rewind

from trainrun import checkpoint
from trainrun.builders import seed_everything
from trainrun.commands import eval as evaluate
from trainrun.commands import export
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.errors import ConfigError

N = 8  # updates


def ema_overrides(corpus: Path, run: Path, *more: str) -> list[str]:
    return tiny(corpus, f"trainer.max_steps={N}", "trainer.eval_every=4",
                "trainer.ckpt_every=1", f"trainer.keep_last={N}", "trainer.log_every=1",
                f"hydra.run.dir={run}", *more)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, corpus) -> Path:
    """A run of N updates with the average and its warm-up, every update checkpointed."""
    cwd = tmp_path_factory.mktemp("ema")
    proc = cli(*ema_overrides(corpus, cwd / "run", "trainer.ema_decay=0.8",
                              "trainer.ema_warmup=true"), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "run"


def initial_weights(*overrides: str) -> dict[str, torch.Tensor]:
    """w_0: the model as the run builds it from its seed, by the names it saves them under."""
    cfg = config(*overrides)
    seed_everything(cfg.trainer.seed)
    model = cfg.model.build(ByteTokenizer.vocab_size)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def expected_average(run: Path, w0: dict, decay: float, warmup: bool) -> dict[int, dict]:
    """ema_k for every checkpointed update k, from its raw weights, in float64:
    ema_k = d_k ema_{k-1} + (1 - d_k) w_k, d_k = min(decay, (1 + k) / (10 + k)) warmed up."""
    ema = {name: value.double() for name, value in w0.items()}
    found = {}
    for path in checkpoint.complete(run / "checkpoints"):
        k = checkpoint.step_number(path)
        d = min(decay, (1 + k) / (10 + k)) if warmup else decay
        raw = weights(path / checkpoint.MODEL_FILE)
        ema = {name: d * ema[name] + (1 - d) * raw[name].double() for name in raw}
        found[k] = ema
    return found


def assert_close(saved: dict, expected: dict) -> None:
    assert saved.keys() == expected.keys()
    for name, value in saved.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value.double(), expected[name], rtol=1e-6, atol=1e-7,
                                   msg=name)


def test_the_saved_average_is_the_formula_over_every_update(ema_run, corpus):
    w0 = initial_weights(*ema_overrides(corpus, ema_run))
    expected = expected_average(ema_run, w0, 0.8, warmup=True)
    assert sorted(expected) == list(range(1, N + 1))
    for k, ema in expected.items():
        path = ema_run / "checkpoints" / checkpoint.step_name(k)
        assert_close(weights(path / checkpoint.EMA_FILE), ema)
    meta = checkpoint.read_meta(ema_run / "checkpoints" / checkpoint.step_name(N))
    assert sorted(meta["sha256"]) == [checkpoint.MODEL_FILE, checkpoint.EMA_FILE,
                                      checkpoint.STATE_FILE]
    raw = final_weights(ema_run)
    assert any(not torch.equal(raw[n], v.float()) for n, v in expected[N].items())


def test_skipped_updates_do_not_move_the_average(tmp_path, corpus):
    """fp16's loss scaler grows its scale 10^4-fold after every update and backs off as
    much after an overflow: every other update is skipped, between ones that step."""
    run = tmp_path / "fp16"
    args = ema_overrides(corpus, run, "trainer.ema_decay=0.7", "precision=fp16",
                         "precision.init_scale=1024", "precision.growth_interval=1",
                         "precision.growth_factor=1e4", "precision.backoff_factor=1e-4")
    m = train(run, *args)
    assert m["status"] == "completed" and m["steps"] == N
    assert m["skipped_updates"] >= N // 2 - 1
    expected = expected_average(run, initial_weights(*args), 0.7, warmup=False)
    for k, ema in expected.items():
        assert_close(weights(run / "checkpoints" / checkpoint.step_name(k) /
                             checkpoint.EMA_FILE), ema)


def test_a_resumed_run_ends_with_the_uninterrupted_runs_average(ema_run, tmp_path):
    part = rewind(ema_run, tmp_path / "part", N // 2 + 1)
    proc = cli(f"resume={part}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for k in range(N // 2 + 2, N + 1):
        name = checkpoint.step_name(k)
        assert_identical(weights(part / "checkpoints" / name / checkpoint.EMA_FILE),
                         weights(ema_run / "checkpoints" / name / checkpoint.EMA_FILE))
    assert_identical(final_weights(part), final_weights(ema_run))
    assert scalars(part, "val/loss_ema") == scalars(ema_run, "val/loss_ema")


def test_val_loss_ema_is_the_loss_of_the_saved_average(ema_run, capsys):
    logged = scalars(ema_run, "val/loss_ema")
    assert [k for k, _ in logged] == [4, 8]
    metrics = json.loads((ema_run / "metrics.json").read_text())
    assert metrics["val_loss_ema"] == pytest.approx(logged[-1][1], rel=1e-6)
    assert metrics["val_loss_ema"] != metrics["val_loss"]
    log = (ema_run / "train.log").read_text()
    assert f"update {N}/{N}: val_loss_ema {metrics['val_loss_ema']:.4f}" in log
    # the run's validation set (eval_sequences=8: 2 batches of 4), as trainrun-eval reads it
    for chosen, key in (("ema", "val_loss_ema"), ("raw", "val_loss")):
        evaluate.main([str(ema_run), "--max-sequences", "8", "--json", "--weights", chosen])
        assert json.loads(capsys.readouterr().out)["loss"] == metrics[key]


def test_export_of_the_average_holds_its_weights(ema_run, tmp_path, capsys):
    export.main([str(ema_run), str(tmp_path / "raw")])
    export.main([str(ema_run), str(tmp_path / "ema"), "--weights", "ema"])
    capsys.readouterr()
    raw, ema = (weights(tmp_path / name / checkpoint.MODEL_FILE) for name in ("raw", "ema"))
    saved = [*weights(ema_run / "checkpoints" / checkpoint.step_name(N) /
                      checkpoint.EMA_FILE).values()]
    saved += [v.T for v in saved if v.dim() == 2]  # a format may store a matrix transposed
    assert raw.keys() == ema.keys()
    # the exported tensors are the average's, under the format's names (the embedding
    # without its padding rows)
    for name, value in ema.items():
        assert any(torch.equal(v[:len(value)], value) for v in saved
                   if v.shape[1:] == value.shape[1:]), name
    assert any(not torch.equal(raw[name], value) for name, value in ema.items())


def test_weights_ema_of_a_run_without_an_average_is_one_line(finished_run, capsys):
    exits_2(evaluate.main, str(finished_run), "--weights", "ema")
    assert "holds no average" in one_line(capsys, "trainrun-eval", "--weights:")


@pytest.mark.parametrize("overrides, key", [
    (["trainer.ema_decay=0"], "trainer.ema_decay"),
    (["trainer.ema_decay=1"], "trainer.ema_decay"),
    (["trainer.ema_decay=1.5"], "trainer.ema_decay"),
    (["trainer.ema_decay=-0.9"], "trainer.ema_decay"),
    (["trainer.ema_warmup=true"], "trainer.ema_warmup"),
    (["trainer.ema_decay=0.99", "optimizer=schedulefree", "scheduler=constant"],
     "trainer.ema_decay"),
])
def test_bad_ema_keys_are_refused(overrides, key):
    with pytest.raises(ConfigError) as error:
        config(*overrides)
    assert error.value.key == key


def test_a_bad_decay_is_one_line_exit_2_and_nothing_written(tmp_path, corpus):
    run = tmp_path / "run"
    proc = cli(*ema_overrides(corpus, run, "trainer.ema_decay=1"), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainrun: error: trainer.ema_decay: got 1")
    assert not run.exists() and not (tmp_path / "outputs").exists()


def test_the_average_starts_from_the_weights_of_a_checkpoint_without_one(tmp_path, corpus):
    run = tmp_path / "run"
    proc = cli(*ema_overrides(corpus, run, "trainer.max_steps=2"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = cli(f"resume={run}", "trainer.max_steps=3", "trainer.ema_decay=0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "holds no average of the weights" in proc.stderr + proc.stdout
    two, three = (run / "checkpoints" / checkpoint.step_name(k) for k in (2, 3))
    w2, w3 = weights(two / checkpoint.MODEL_FILE), weights(three / checkpoint.MODEL_FILE)
    assert not checkpoint.has_ema(two)
    assert_close(weights(three / checkpoint.EMA_FILE),
                 {n: 0.5 * w2[n].double() + 0.5 * w3[n].double() for n in w2})
    assert math.isfinite(json.loads((run / "metrics.json").read_text())["val_loss_ema"])
