"""TensorBoard scalars, per-log_every records and metrics.json (docs/outputs.md).

x-axis = update number k. `train/lr` is written at every update; the training loss (mean
over the updates since the last record), grad norm, clip coefficient, loss scale,
throughput and, on a GPU whose peak trainrun.flops knows, MFU at k = 1 and every log_every
updates. Values stay on the device between records: one host read per record, none per
update. The other trackers (trainrun.trackers) receive the same scalars at the same k.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import torch

from trainrun import flops, rundir
from trainrun.console import Console
from trainrun.errors import out_of_space
from trainrun.trackers import Trackers
from trainrun.update import UpdateResult

# wall_seconds and tokens_per_sec: the whole run's, over every process that trained it;
# session_*: this process's alone (they differ after a resume)
SUMMARY_KEYS = ("status", "steps", "tokens", "train_loss", "val_loss", "best_val_loss",
                "skipped_updates", "wall_seconds", "tokens_per_sec", "session_wall_seconds",
                "session_tokens_per_sec", "parameters", "val_bleu", "val_chrf", "val_loss_ema",
                "sources")


class Metrics:
    def __init__(self, run_dir: Path, console: Console, log_every: int, max_steps: int,
                 first_step: int = 1, writes: bool = True, earlier_seconds: float = 0.0,
                 tb_name: str | None = None, trackers: Trackers | None = None,
                 flops_per_token: float = 0.0, peak_flops: float | None = None):
        """first_step > 1 continues a resumed run: TensorBoard drops whatever an earlier
        process logged at steps >= first_step, so curves have no duplicated steps;
        earlier_seconds: the time earlier processes trained it. With `writes` false (ranks
        other than 0), nothing is written: no events, no metrics.json. The events go into
        tb/, or tb/<tb_name>/ (a sweep's job, so that TensorBoard names it by its overrides).
        `trackers`: where the same scalars go besides (rank 0's); `peak_flops`: the peak of
        all the run's devices together (None: no train/mfu), `flops_per_token` the model's."""
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.console, self.writes = run_dir, console, writes
        self.log_every, self.max_steps = log_every, max_steps
        self.trackers = trackers if trackers is not None and writes else _NO_TRACKERS
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.writer = SummaryWriter(str(run_dir / "tb" / (tb_name or "")),
                                    purge_step=first_step if first_step > 1 else None) \
            if writes else _NoWriter()
        self.started = time.perf_counter()
        self.earlier_seconds = earlier_seconds
        self.session_tokens = 0
        self._reset_window()
        self._excepthook = threading.excepthook
        threading.excepthook = _quiet_full_disk(self._excepthook)

    def _reset_window(self) -> None:
        self.loss_sum, self.updates, self.tokens = None, 0, 0
        self.window_start = time.perf_counter()

    def update(self, k: int, lr: float, result: UpdateResult, tokens: int,
               loss_scale: torch.Tensor | None, skipped_updates: int) -> float | None:
        """Update k is done: it applied `lr` and trained on `tokens` target tokens. Returns
        the training loss when this update writes a record."""
        self.writer.add_scalar("train/lr", lr, k)
        self.trackers.log({"train/lr": lr}, k)
        loss = result.loss.detach()
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.updates += 1
        self.tokens += tokens
        self.session_tokens += tokens
        if k == 1 or k % self.log_every == 0 or k == self.max_steps:
            return self._record(k, lr, result, loss_scale, skipped_updates)
        self.console.advance(k)
        return None

    def _record(self, k, lr, result, loss_scale, skipped_updates) -> float:
        values = [self.loss_sum / self.updates, result.grad_norm, result.clip_coef]
        if loss_scale is not None:
            values.append(loss_scale)
        device = values[0].device
        values = torch.stack([v.float().reshape(()).to(device) for v in values]).tolist()  # one sync
        loss, grad_norm, clip_coef = values[:3]
        seconds = time.perf_counter() - self.window_start
        tps = self.tokens / seconds if seconds > 0 else math.nan
        mfu = flops.mfu(tps, self.flops_per_token, self.peak_flops)
        scalars = {"train/loss": loss, "train/grad_norm": grad_norm, "train/clip_coef": clip_coef,
                   "train/tokens_per_sec": tps, "train/skipped_updates": skipped_updates}
        text = (f"step {k}/{self.max_steps} | loss {loss:.4f} | lr {lr:.3e} | "
                f"grad_norm {grad_norm:.3f} | clip_coef {clip_coef:.3f} | tok/s {tps:,.0f}")
        if mfu is not None:
            scalars["train/mfu"] = mfu
            text += f" | mfu {mfu:.1%}"
        if loss_scale is not None:
            scalars["train/loss_scale"] = values[3]
            text += f" | loss_scale {values[3]:g}"
        if skipped_updates:
            text += f" | skipped {skipped_updates}"
        self._scalars(scalars, k)
        self.console.record(text)
        self.console.advance(k, loss=f"{loss:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
        self._reset_window()
        return loss

    def validation(self, k: int, loss: float, best: float, best_step: int,
                   seconds: float, ema: float | None = None) -> None:
        """val/loss at update k, the best so far and the update that measured it, and
        val/loss_ema, that of the weights' moving average (trainer.ema_decay; None: none);
        the `seconds` validation took do not count against tokens/s."""
        self.window_start += seconds
        self._scalars({"val/loss": loss, **({"val/loss_ema": ema} if ema is not None else {})},
                      k)
        # a message, not a record: validation is rare enough to show above the bar too
        self.console.info(validation_line(k, self.max_steps, loss, best, best_step))
        if ema is not None:
            self.console.info(f"update {k}/{self.max_steps}: val_loss_ema {ema:.4f} (the "
                              f"weights' moving average)")
        self.console.advance(k, val=f"{loss:.4f}")

    def sources(self, k: int, losses: dict[str, float], seen: dict[str, dict]) -> None:
        """A mixture's val/<name>/loss at update k, and how often each source has been seen
        (data/<name>/epochs: its sequences drawn over its training sequences)."""
        self._scalars({**{f"val/{name}/loss": loss for name, loss in losses.items()},
                       **{f"data/{name}/epochs": s["epochs"] for name, s in seen.items()}}, k)
        self.console.info(f"update {k}/{self.max_steps}: " + " | ".join(
            f"{name} val_loss {losses[name]:.4f}, {s['epochs']:.2f} epochs "
            f"({s['sequences']:,} sequences)" for name, s in seen.items()))

    def translation(self, k: int, scores, seconds: float) -> None:
        """val/bleu and val/chrf at update k (trainer.bleu_every): sacreBLEU's scores of the
        greedy translations of the first trainer.bleu_sentences validation pairs."""
        self.window_start += seconds
        self._scalars({"val/bleu": scores.bleu, "val/chrf": scores.chrf}, k)
        self.console.info(f"update {k}/{self.max_steps}: val BLEU {scores.bleu:.2f} | chrF "
                          f"{scores.chrf:.2f} (greedy, the first {scores.sentences:,} "
                          f"validation pairs, {seconds:.1f}s)")

    def _scalars(self, scalars: dict[str, float], k: int) -> None:
        """Scalars of update k, by tag, into TensorBoard and the trackers, which hand on what
        they buffered since the last record."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, k)
        self.trackers.log(scalars, k)
        self.trackers.flush()

    def tokens_per_second(self) -> float:
        """Target tokens trained on per second of this process's run."""
        seconds = time.perf_counter() - self.started
        return self.session_tokens / seconds if self.session_tokens else math.nan

    def run_seconds(self) -> float:
        """The whole run's training time so far: earlier processes' and this one's."""
        return self.earlier_seconds + time.perf_counter() - self.started

    def finish(self, summary: dict, hparams: dict) -> dict:
        """Write metrics.json, and the HParams entry once the run has completed (so once per
        run: a completed run is not resumed); return the summary as written. On a full disk
        they are left out with a warning: the run reports how it ended anyway."""
        session, whole = time.perf_counter() - self.started, self.run_seconds()
        summary = {**summary, "wall_seconds": round(whole, 3),
                   "tokens_per_sec": summary["tokens"] / whole if whole > 0 else math.nan,
                   "session_wall_seconds": round(session, 3),
                   "session_tokens_per_sec": self.tokens_per_second()}
        summary = {key: _finite_or_none(summary.get(key)) for key in SUMMARY_KEYS}
        finals = {f"hparam/{key}": summary[key] for key in ("best_val_loss", "val_loss", "train_loss")
                  if summary[key] is not None}
        if not self.writes:
            return summary
        self.trackers.finish(summary)
        try:  # by rename: a full disk leaves an earlier process's metrics.json whole
            rundir.write(self.run_dir / "metrics.json",
                         json.dumps(summary, indent=2, allow_nan=False) + "\n", self.run_dir)
        except Exception as error:
            full = out_of_space(error)
            if full is None:
                raise
            self.console.warning(f"metrics.json not written: {full.strerror}")
        try:
            if summary["status"] == "completed":
                self.writer.add_hparams(hparams, finals, run_name=".")
            self.writer.close()
        except Exception as error:
            full = out_of_space(error)
            if full is None:
                raise
            self.console.warning(f"TensorBoard's last records not written: {full.strerror}")
        threading.excepthook = self._excepthook
        return summary


class _NoWriter:
    """SummaryWriter's calls, writing nothing."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    add_hparams = add_scalar

    def close(self) -> None:
        pass


class _NoTrackers:
    """Trackers' calls, to no tracker."""

    def log(self, *args) -> None:
        pass

    flush = finish = log


_NO_TRACKERS = _NoTrackers()


def validation_line(k: int, max_steps: int, loss: float, best: float, best_step: int) -> str:
    """The one line a validation prints (terminal, plain output and train.log alike):
    `update 100/500: val_loss 2.3141 (best 2.3141, improved)` when update k set the best,
    else `... (best 2.2010 at update 100)`; best_step 0 means no best is known."""
    if best_step == k:
        where = ", improved"
    else:
        where = f" at update {best_step}" if best_step else ""
    return f"update {k}/{max_steps}: val_loss {loss:.4f} (best {best:.4f}{where})"


def _quiet_full_disk(excepthook):
    """TensorBoard writes its events from a thread, which on a full disk dies with a
    traceback on stderr; the writer raises the same error at its next call, and the run
    reports that in one line. This hook drops the thread's traceback, for a full disk only."""
    def hook(args):
        writer = type(args.thread).__module__.startswith("tensorboard.")
        if not writer or out_of_space(args.exc_value) is None:
            excepthook(args)
    return hook


def _finite_or_none(value):
    """JSON has no NaN or Infinity: a loss never measured (no validation yet) is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
