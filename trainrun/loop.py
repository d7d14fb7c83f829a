"""The training loop: `fit()` runs updates k = c.k + 1 .. max_steps, validating and saving
on their cadences, until the run completes, fails or is asked to stop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainrun import checkpoint, translate, validation
from trainrun.cadence import Cadence
from trainrun.console import Console
from trainrun.data.order import micro_batches
from trainrun.data.stream import StreamFailed, StreamStopped
from trainrun.distributed import one_name_per_tensor
from trainrun.errors import out_of_space
from trainrun.metrics import Metrics
from trainrun.optimizers import eval_weights
from trainrun.signals import Signals, name
from trainrun.state import Components
from trainrun.update import UpdateResult, train_update


class NonFinite(Exception):
    """The weights at update k are not finite numbers: nothing is saved for them, and
    `previous`, the newest checkpoint (None if there is none), is the last good one. str()
    is one line. They became so at update k itself: weights that are not finite give a
    non-finite loss, so every later update would have been skipped."""

    advice = "change what made them so (a lower optimizer.lr, clipping, the optimizer's eps)"

    def __init__(self, k: int, previous: Path | None):
        self.previous = previous
        last = (f"the last good checkpoint is {previous.name} and checkpoints/latest names "
                f"it" if previous is not None else "there is no earlier checkpoint")
        super().__init__(f"the weights became non-finite at update {k} (NaN, inf, or too "
                         f"large for the sum of their squares in float32); nothing was saved "
                         f"for it; {last}")


@dataclass
class Outputs:
    metrics: Metrics
    console: Console
    ckpt_root: Path  # run_dir / "checkpoints"
    meta: dict  # written into every checkpoint's meta.json
    saved_k: int | None = None  # the update whose checkpoint this run last wrote or loaded
    failure: checkpoint.NoSpace | NonFinite | StreamFailed | None = None  # why the run failed
    cadence: Cadence = field(init=False)  # saves by time and best val/loss, early stopping

    def __post_init__(self) -> None:
        self.cadence = Cadence(self.ckpt_root)


def fit(t: Components, out: Outputs, signals: Signals) -> str:
    """Train until k = max_steps; return the status: completed, stopped or failed.

    A full disk fails the run (out.failure says why): the newest checkpoint is intact, and
    going on would only lose more updates at the next save. So do weights found not finite
    when they are to be saved: that checkpoint is not written."""
    try:
        return train(t, out, signals)
    except (checkpoint.NoSpace, NonFinite) as error:
        out.failure = error
    except StreamFailed as error:  # data that cannot be read on: nothing new is saved
        saved = checkpoint.complete(out.ckpt_root) if out.ckpt_root.exists() else []
        error.previous = saved[-1] if saved else None
        out.failure = error
    except Exception as error:
        full = out_of_space(error)  # TensorBoard's events, for one
        if full is None:
            raise
        out.failure = checkpoint.NoSpace.outside_saves(full, out.ckpt_root)
    out.console.warning(f"stopping: {out.failure}")
    return "failed"


def train(t: Components, out: Outputs, signals: Signals) -> str:
    """fit() without the handling of a full disk."""
    cfg, c = t.cfg, t.counters
    out.console.start_progress(cfg.max_steps, c.k)
    if hasattr(t.order, "stopping") and t.world.size == 1:  # a stream: it can stop a wait
        t.order.stopping = lambda: signals.requested is not None
    t.replicas.module.train()
    while c.k < cfg.max_steps:
        k = c.k + 1
        lr = t.schedule.apply(t.optimizer, k)
        try:
            result, n_targets = one_update(t, stop=signals.requested or 0)
        except StreamStopped:  # asked to stop while the stream's reader was behind
            save(t, out)
            out.console.warning(f"{name(signals.requested)}: stopped after update {c.k}, "
                                f"while waiting for the stream's rows")
            return "stopped"
        if result.stepped:
            c.k, c.tokens, c.skipped_in_a_row = k, c.tokens + n_targets, 0
            if t.ema is not None:  # a skipped update leaves it too
                t.ema.update(k)
            recorded = out.metrics.update(k, lr, result, n_targets, t.precision.loss_scale(),
                                          c.skipped_updates)
            c.train_loss = c.train_loss if recorded is None else recorded
            if k % cfg.eval_every == 0 or k == cfg.max_steps:
                validate(t, out)
            if cfg.bleu_every and (k % cfg.bleu_every == 0 or k == cfg.max_steps):
                translate_validation(t, out)
            if out.cadence.save_due(t, k):
                save(t, out)
            if (early := out.cadence.patience_out(t)) and k < cfg.max_steps:
                save(t, out)
                out.console.info(early)
                return "completed"
        elif skip(t, out, result, k):
            save(t, out)  # the last good state: a skipped update changed nothing
            return "failed"
        if result.stop and c.k < cfg.max_steps:  # asked of this rank or another
            signals.requested = signals.requested or result.stop
            save(t, out)
            out.console.warning(f"{name(signals.requested)}: stopped after update {c.k}")
            return "stopped"
    return "completed"


def one_update(t: Components, stop: int = 0) -> tuple[UpdateResult, int]:
    """Train on the next window of the data order (this rank's share of it); return the
    result and the window's target count. `stop`: the signal this rank was asked to stop
    by (0: none)."""
    w = t.world
    indices = t.order.next_window(t.sequences_per_update())
    batches = [t.train.batch(ix) for ix in micro_batches(indices, t.batch_size, w.rank, w.size)]
    n_targets = t.train.num_targets(indices)
    result = train_update(t.replicas, batches, n_targets, t.optimizer, t.clipper, t.precision,
                          t.device, stop, t.cfg.label_smoothing, t.raw_model.vocab_size)
    return result, n_targets


def skip(t: Components, out: Outputs, result: UpdateResult, k: int) -> bool:
    """Count a skipped update; True when trainer.max_skipped in a row mean the run must stop.

    Under fp16 an overflow of the scaled gradients is the loss scaler's normal search for
    its scale and does not count towards max_skipped; a non-finite loss always does.
    """
    c = t.counters
    c.skipped_updates += 1
    loss_finite = bool(torch.isfinite(result.loss))  # read back only on a skipped update
    if t.precision.mode != "fp16" or not loss_finite:
        c.skipped_in_a_row += 1
    # every non-finite loss is reported; loss-scale overflows at 1, 2, 4, 8, ... skips
    if not loss_finite or c.skipped_updates & (c.skipped_updates - 1) == 0:
        what = "loss" if not loss_finite else "gradients"
        scale = t.precision.loss_scale()
        detail = f"; loss scale now {scale.item():g}" if scale is not None else ""
        out.console.warning(f"update {k} skipped: non-finite {what}{detail} "
                            f"({c.skipped_updates} skipped so far); k and the schedule stay "
                            f"at {k}")
    if c.skipped_in_a_row >= t.cfg.max_skipped:
        out.console.warning(
            f"stopping: {c.skipped_in_a_row} updates in a row had a non-finite loss or "
            f"gradients (trainer.max_skipped={t.cfg.max_skipped}); saving the state of "
            f"update {c.k}, if its weights are finite")
        return True
    return False


def validate(t: Components, out: Outputs) -> None:
    c = t.counters
    started = time.perf_counter()
    with eval_weights(t.optimizer):
        c.val_loss, c.val_sources = validation.losses(t)
    if t.ema is not None:
        with t.ema.swapped_in():
            c.val_loss_ema = validation.loss(t)
    if c.val_loss < c.best_val_loss:  # False for NaN: a NaN is never the best
        c.best_val_loss, c.best_val_step = c.val_loss, c.k
    t.schedule.observe(c.val_loss)
    out.metrics.validation(c.k, c.val_loss, c.best_val_loss, c.best_val_step,
                           time.perf_counter() - started,
                           c.val_loss_ema if t.ema is not None else None)
    if c.val_sources:  # a mixture: each source's loss, and how much of it has been seen
        out.metrics.sources(c.k, c.val_sources, t.order.seen())


def translate_validation(t: Components, out: Outputs) -> None:
    """BLEU and chrF of greedy translations of the first trainer.bleu_sentences validation
    pairs (every rank decodes them all: under FSDP each forward pass gathers the shards on
    every rank; rank 0 records)."""
    started = time.perf_counter()
    t.replicas.module.eval()
    try:
        with eval_weights(t.optimizer):
            scores, _ = translate.scores_of(t.raw_model, t.tokenizer, t.val,
                                            t.cfg.bleu_sentences, translate.Search(beam=1),
                                            t.precision.autocast)
    finally:
        t.replicas.module.train()
    t.counters.val_bleu, t.counters.val_chrf = scores.bleu, scores.chrf
    out.metrics.translation(t.counters.k, scores, time.perf_counter() - started)


def save(t: Components, out: Outputs) -> None:
    """Checkpoint update k, once (a periodic save and a stop can fall on the same k); rank 0
    writes it, the replicas of the other ranks being the same, and sharded every rank its
    shards."""
    if out.saved_k == t.counters.k:
        return
    t.counters.wall_seconds = out.metrics.run_seconds()
    with eval_weights(t.optimizer):  # the weights to export, and the state to resume
        if not weights_finite(t):  # a checkpoint is a good state: never one of these
            previous = checkpoint.complete(out.ckpt_root)
            raise NonFinite(t.counters.k, previous[-1] if previous else None)
        state = t.state_dict()  # on every rank: each one's GPU generator is gathered
        if t.replicas.sharded:
            checkpoint.save_sharded(out.ckpt_root, t.counters.k, t.replicas, t.optimizer,
                                    state, out.meta, t.cfg.keep_last, t.world.main, t.ema)
        elif t.world.main:
            checkpoint.save(out.ckpt_root, t.counters.k, t.raw_model, state, out.meta,
                            t.cfg.keep_last, ema=ema_weights(t))
    out.saved_k = t.counters.k
    out.cadence.saved(t, out.ckpt_root / checkpoint.step_name(t.counters.k))


def ema_weights(t: Components) -> dict[str, torch.Tensor] | None:
    """The whole weights with the average in place of the parameters, on the host and by
    name as model.safetensors stores them (each tied tensor once); None without an average.
    Unsharded: save_sharded gathers its own."""
    if t.ema is None:
        return None
    with t.ema.swapped_in():
        weights = {name: value.detach().to("cpu", copy=True)
                   for name, value in t.raw_model.state_dict().items()}
    return one_name_per_tensor(t.raw_model, weights)


def weights_finite(t: Components) -> bool:
    """The weights are finite, and small enough that the sum of their squares is finite in
    float32 (|w| up to about 1e19: far past any that trained). One foreach norm over all
    parameters (this rank's shards, summed over ranks under FSDP) and one read of the
    device, at save time only: the updates themselves add no sync for it."""
    local = [p.detach().to_local() if hasattr(p, "to_local") else p.detach()
             for p in t.raw_model.parameters()]
    total = torch.stack(torch._foreach_norm(local)).float().square().sum()
    if t.replicas.sharded:
        total = t.replicas.sum(total)
    return bool(torch.isfinite(total))
