#!/usr/bin/env python
"""trainrun's update path against a bare, hand-written PyTorch loop (docs/performance.md).

    python scripts/bench.py [Hydra overrides]     e.g. model=gpt_small precision=bf16

Both run in this process on the same model (the same initial weights), the same batches
(the run's seeded data order), the same optimizer kernels, clipping and precision: the run
is built exactly as `trainrun` builds it. After a warm-up they alternate, A B A B, blocks
of updates, and the medians of the blocks are compared. Human-readable lines, then one
JSON object as the last line: runner_tokens_per_s, bare_tokens_per_s, overhead_ratio
(runner seconds per update / bare), mfu (null on CPU or an unknown GPU), startup_s (the
`trainrun` command's time to its first update), peak_mem_mb and bare_peak_mem_mb (on a GPU
each side's own peak: what it allocates beyond what the other side keeps there; on the CPU
peak_mem_mb is the process's, both together, and bare_peak_mem_mb null), device, and the
settings. With trainer.compile=true both sides are compiled.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from trainrun.flops import mfu as mfu_of
from trainrun.flops import peak_flops, peak_of  # noqa: F401 (peak_of: the tests')


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Runner:
    """trainrun's own update path: schedule, one_update (data, micro-batches, precision,
    clipping, skip decision), metrics (TensorBoard's train/lr every update, records)."""

    def __init__(self, trainer, run_dir: Path, log_every: int):
        from trainrun.console import Console
        from trainrun.metrics import Metrics

        self.t = trainer
        self.metrics = Metrics(run_dir, Console(silent=True), log_every, 10**9)
        self.k = 0

    def update(self) -> int:
        from trainrun.loop import one_update

        t, self.k = self.t, self.k + 1
        lr = t.schedule.apply(t.optimizer, self.k)
        result, n_targets = one_update(t)
        self.metrics.update(self.k, lr, result, n_targets, t.precision.loss_scale(), 0)
        return n_targets


class Bare:
    """The same work, written by hand: the batches are made up front (pinned on CUDA)."""

    def __init__(self, trainer, cfg, windows):
        self.model = copy.deepcopy(trainer.raw_model)
        # compiled as the runner's is, so that the row compares like with like
        self.forward = torch.compile(self.model) if cfg.trainer.compile else self.model
        self.device = trainer.device
        self.lrs = [trainer.schedule(k) for k in range(1, len(windows) + 1)]  # lr(k), pure
        groups = [{**g, "params": [self._twin(trainer.raw_model, p) for p in g["params"]]}
                  for g in trainer.optimizer.param_groups]
        self.optimizer = type(trainer.optimizer)(groups, **{
            k: v for k, v in trainer.optimizer.defaults.items() if k in ("fused", "foreach")})
        self.max_norm = getattr(cfg.clip, "max_norm", None)
        mode = trainer.precision.mode
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(self.device.type) if mode == "fp16" else None
        self.batches = windows
        self.i = 0

    def _twin(self, original: torch.nn.Module, param: torch.nn.Parameter):
        names = {id(p): n for n, p in original.named_parameters()}
        return self.model.get_parameter(names[id(param)])

    def update(self) -> int:
        micro, n_targets = self.batches[self.i]
        for group in self.optimizer.param_groups:
            group["lr"] = self.lrs[self.i]
        self.i += 1
        for x, y in micro:
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
                logits = self.forward(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100,
                                   reduction="sum") / n_targets
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_norm is not None:  # as clip_grad_norm_, without its 1e-6 in the divisor
            grads = [p.grad for group in self.optimizer.param_groups for p in group["params"]
                     if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            torch._foreach_mul_(grads, self.max_norm / norm.clamp(min=self.max_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return n_targets


def resident(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes that one side keeps on the GPU between updates: weights, buffers, gradients and
    optimizer state."""
    tensors = [*model.parameters(), *model.buffers(),
               *(p.grad for p in model.parameters() if p.grad is not None),
               *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")


def windows(trainer, count: int) -> list:
    """The run's first `count` updates' micro-batches and target counts, from a copy of its
    data order (the runner's own order is left to the runner)."""
    order, b = copy.deepcopy(trainer.order), trainer.batch_size
    # a stream (data.streaming=true) is its own order: its copy holds the window it handed out
    data = order if trainer.order is trainer.train else trainer.train
    out = []
    try:
        for _ in range(count):
            idx = order.next_window(trainer.sequences_per_update())  # one process
            micro = [data.batch(idx[i:i + b]) for i in range(0, len(idx), b)]
            if trainer.device.type == "cuda":
                micro = [(x.pin_memory(), y.pin_memory()) for x, y in micro]
            out.append((micro, data.num_targets(idx)))
    finally:
        if hasattr(order, "close"):  # the copy's reading thread
            order.close()
    return out


def timed(path, updates: int, device: torch.device) -> tuple[float, int]:
    """Seconds per update and target tokens of `updates` updates."""
    sync(device)
    start = time.perf_counter()
    tokens = sum(path.update() for _ in range(updates))
    sync(device)
    return (time.perf_counter() - start) / updates, tokens


def startup_seconds(overrides: list[str]) -> float:
    """The `trainrun` command's time from launch to its first update's record."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(sys.executable).with_name("trainrun")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trainrun"]
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*cmd, *overrides, "trainer.max_steps=2", "trainer.log_every=1",
             "trainer.eval_every=1000", "trainer.eval_sequences=1", f"hydra.run.dir={tmp}/run"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = None
        for line in proc.stdout:
            if seconds is None and line.startswith("step 1/"):
                seconds = time.perf_counter() - start
        proc.wait()
        if seconds is None:
            raise SystemExit(f"bench: `trainrun` did not reach its first update (exit {proc.returncode})")
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for trainrun")
    parser.add_argument("--updates", type=int, default=20, help="updates per timed block")
    parser.add_argument("--pairs", type=int, default=5, help="A B pairs of blocks")
    parser.add_argument("--warmup", type=int, default=5, help="untimed updates of each first")
    args = parser.parse_args()

    from trainrun import builders, runner
    from trainrun.composition import fail, validated_configs
    from trainrun.console import Console
    from trainrun.errors import ConfigError

    try:
        cfg = validated_configs([args.overrides])[0]
        if cfg.model.task != "lm":  # the bare loop below reads sequences: model(x)
            raise ConfigError("model", f"{cfg.model.family} ({cfg.model.task}): the benchmark "
                                       f"measures decoders; allowed: a gpt_* or llama_* option")
        device, precision = runner.device_and_precision(cfg)
    except ConfigError as error:
        fail(error, "bench")
    build_started = time.perf_counter()
    trainer = builders.build_components(cfg, device, precision, Console(silent=True))
    build_seconds = time.perf_counter() - build_started
    bare = Bare(trainer, cfg, windows(trainer, args.updates * args.pairs + args.warmup))
    with tempfile.TemporaryDirectory() as tmp:
        ours = Runner(trainer, Path(tmp), cfg.trainer.log_every)
        trainer.replicas.module.train()
        for path in (ours, bare):
            timed(path, args.warmup, device)
        runs = {"runner": [], "bare": []}
        peaks = {"runner": 0, "bare": 0}  # bytes, each side's own (CUDA)
        others = {"runner": resident(bare.model, bare.optimizer),
                  "bare": resident(trainer.raw_model, trainer.optimizer)}
        for _ in range(args.pairs):
            for name, path in (("runner", ours), ("bare", bare)):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                runs[name].append(timed(path, args.updates, device))
                if device.type == "cuda":  # less what the other side keeps on the GPU
                    peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device)
                                      - others[name])
        ours.metrics.writer.close()

    seconds = {name: statistics.median(s for s, _ in blocks) for name, blocks in runs.items()}
    tokens_per_update = runs["runner"][0][1] / args.updates
    tps = {name: tokens_per_update / s for name, s in seconds.items()}
    seq_len = cfg.data.seq_len
    peak = peak_flops(device, precision.mode)
    mfu = mfu_of(tps["runner"], trainer.raw_model.flops_per_token(seq_len), peak)
    # on the CPU the process's peak resident memory, both sides together (no split there)
    peak_mb = (peaks["runner"] / 2**20 if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    bare_peak_mb = peaks["bare"] / 2**20 if device.type == "cuda" else None
    startup = startup_seconds(args.overrides)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    print(f"device {name} ({threads} threads), precision {precision.mode}, compile "
          f"{cfg.trainer.compile}; model {trainer.raw_model.num_params():,} parameters, "
          f"{tokens_per_update:,.0f} tokens per update; build {build_seconds:.1f}s")
    for what in ("runner", "bare"):
        blocks = ", ".join(f"{s * 1e3:.2f}" for s, _ in runs[what])
        print(f"{what:>6}: {tps[what]:>12,.0f} tokens/s  median {seconds[what] * 1e3:.2f} ms/update"
              f"  (blocks: {blocks} ms)")
    ratio = seconds["runner"] / seconds["bare"]
    print(f"overhead ratio (runner / bare seconds per update): {ratio:.3f}")
    # the same work: after the same updates on the same batches, the same weights
    ours_w, bare_w = trainer.raw_model.state_dict(), bare.model.state_dict()
    diff = max(((ours_w[n] - bare_w[n]).abs().max() / bare_w[n].abs().max()).item()
               for n in bare_w)
    print(f"same work: after {bare.i} updates each, the weights differ by at most {diff:.1e} "
          f"(relative)")
    print(f"MFU: {'n/a' if mfu is None else f'{mfu:.1%}'}; peak memory {peak_mb:,.0f} MB; "
          f"start-up to the first update {startup:.1f}s")
    print(json.dumps({
        "runner_tokens_per_s": round(tps["runner"], 1), "bare_tokens_per_s": round(tps["bare"], 1),
        "overhead_ratio": round(ratio, 4), "mfu": None if mfu is None else round(mfu, 4),
        "startup_s": round(startup, 2), "peak_mem_mb": round(peak_mb, 1),
        "bare_peak_mem_mb": None if bare_peak_mb is None else round(bare_peak_mb, 1),
        "device": name,
        "precision": precision.mode, "compile": cfg.trainer.compile, "threads": threads,
        "weights_max_rel_diff": diff, "overrides": args.overrides,
    }))


if __name__ == "__main__":
    main()
