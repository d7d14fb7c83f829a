"""Compare optimizers by the time they take to a target validation loss: the default model
(gpt_tiny) on the built-in data, adamw+cosine, muon+cosine, adafactor (scheduler=constant:
its own 1/sqrt(t) decay) and schedulefree (scheduler=constant), all with the same warmup,
for the same number of updates and the same seeds, through the real `trainrun` command:
a round per seed, in which the four runs train at the same time, one thread each, so that
the machine's load (shared, changing) falls on every option alike and wall times compare.

For each optimizer it reports val/loss at fixed updates (the validations nearest a quarter,
half and all of the run), the updates and the wall seconds (from the run's start,
validations included) until val/loss first reaches --target, and the wall seconds of the
whole run (metrics.json), each the mean over the seeds, and the optimizer's state memory (its state tensors after one update of the same model, in
train mode). val/loss and its wall times are read from each run's TensorBoard events.
Prints a Markdown table and writes a plot.

    python scripts/optimizers.py [--updates 300] [--eval-every 25] [--target 2.6]
        [--seeds 1337 1338] [--runs DIR] [--plot docs/optimizers.png] [overrides ...]

Extra arguments are trainrun overrides given to every run (e.g. data.batch_size=16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

OPTIONS = {  # label -> the overrides that pick it
    "adamw + cosine": ["optimizer=adamw", "scheduler=cosine"],
    "muon + cosine": ["optimizer=muon", "scheduler=cosine"],
    "adafactor": ["optimizer=adafactor", "scheduler=constant"],  # its own 1/sqrt(t) decay
    "schedulefree": ["optimizer=schedulefree", "scheduler=constant"],
}


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    root = Path(__file__).resolve().parents[1]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=300, help="trainer.max_steps of every run")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="data.batch_size")
    p.add_argument("--warmup", type=int, default=10, help="warmup updates, the same for all")
    p.add_argument("--target", type=float, default=2.6, help="the validation loss to reach")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338])
    p.add_argument("--runs", type=Path, default=None, help="where the runs go (default: a "
                   "temporary directory); completed runs found there are reused, so that the "
                   "table can be redrawn, e.g. for another --target")
    p.add_argument("--plot", type=Path, default=root / "docs" / "optimizers.png")
    return p.parse_known_args()


def overrides(args: argparse.Namespace, option: list[str], seed: int) -> list[str]:
    return [*option, f"trainer.max_steps={args.updates}", f"trainer.eval_every={args.eval_every}",
            f"trainer.eval_sequences={args.eval_sequences}", f"data.batch_size={args.batch_size}",
            f"scheduler.warmup_steps={args.warmup}", "scheduler.warmup_ratio=null",
            f"trainer.ckpt_every={args.updates}", f"trainer.seed={seed}", "trainer.device=cpu"]


def train_together(jobs: list[tuple[Path, list[str]]]) -> None:
    """Run `trainrun argv` into each run_dir, all at the same time, one thread each: on a
    shared machine whose load changes, runs made at the same time see the same load, so
    their wall times compare."""
    exe = Path(sys.executable).with_name("trainrun")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trainrun"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [(argv, subprocess.Popen([*cmd, *argv, f"hydra.run.dir={run_dir}"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)) for run_dir, argv in jobs]
    for argv, proc in procs:
        stderr = proc.communicate()[1]
        if proc.returncode != 0:
            sys.exit(f"trainrun {' '.join(argv)} failed:\n{stderr}")


def val_curve(run_dir: Path) -> tuple[list[int], list[float], list[float]]:
    """(update, val/loss, wall seconds since the run's first event) of each validation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    start = acc.FirstEventTimestamp()
    events = acc.Scalars("val/loss")
    return ([e.step for e in events], [e.value for e in events],
            [e.wall_time - start for e in events])


def state_bytes(argv: list[str]) -> int:
    """Bytes of the optimizer's state tensors after one update, built as trainrun builds it."""
    from trainrun.composition import validated_configs
    from trainrun.data.tokenizers import ByteTokenizer
    from trainrun.optimizers import build_optimizer

    (cfg,) = validated_configs([argv])
    torch.manual_seed(0)
    model = cfg.model.build(ByteTokenizer.vocab_size)
    optimizer = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    x = torch.randint(0, ByteTokenizer.vocab_size, (2, cfg.data.seq_len))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    optimizer.step()
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if isinstance(t, torch.Tensor))


def first_reach(updates, losses, seconds, target) -> tuple[int | None, float | None]:
    for k, loss, s in zip(updates, losses, seconds, strict=True):
        if loss <= target:
            return k, s
    return None, None


def summarize(args, label: str, curves: list[tuple], state: int, params: int) -> dict:
    evals = curves[0][0]  # the updates validated at, the same in every run
    marks = sorted({min(evals, key=lambda k: abs(k - n))
                    for n in (args.updates / 4, args.updates / 2, args.updates)})
    row: dict = {"optimizer": label}
    for k in marks:
        row[f"val@{k}"] = statistics.mean(c[1][c[0].index(k)] for c in curves)
    reached = [first_reach(*c, args.target) for c in curves]
    if all(k is not None for k, _ in reached):
        row["updates_to_target"] = statistics.mean(k for k, _ in reached)
        row["seconds_to_target"] = statistics.mean(s for _, s in reached)
    else:
        row["updates_to_target"] = row["seconds_to_target"] = None
    row["state_MiB"] = state / 2**20
    row["state_x_params"] = state / params
    return row


def table(rows: list[dict], target: float) -> str:
    keys = [k for k in rows[0] if k.startswith("val@")]
    head = ["optimizer", *(f"val loss @{k[4:]}" for k in keys), f"updates to {target:g}",
            f"seconds to {target:g}", "seconds for the run", "optimizer state"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        reach = ("not reached", "—") if r["updates_to_target"] is None else (
            f"{r['updates_to_target']:g}", f"{r['seconds_to_target']:.0f}")
        cells = [r["optimizer"], *(f"{r[k]:.3f}" for k in keys), *reach,
                 f"{r['run_seconds']:.0f}", f"{r['state_MiB']:.2f} MiB ({r['state_x_params']:.2f}× params)"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[str, list[tuple]], target: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    by_update, by_time = fig.subplots(1, 2, sharey=True)
    for i, (label, curves) in enumerate(results.items()):
        for j, (updates, losses, seconds) in enumerate(curves):
            name = label if j == 0 else None
            by_update.plot(updates, losses, color=f"C{i}", marker=".", label=name)
            by_time.plot(seconds, losses, color=f"C{i}", marker=".", label=name)
    for ax, xlabel in ((by_update, "update"), (by_time, "wall seconds (validations included)")):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1)
        ax.set(xlabel=xlabel)
        ax.grid(alpha=0.3)
    by_update.set(ylabel="validation loss", title="gpt_tiny on the built-in data")
    by_update.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main() -> None:
    args, extra = parse_args()
    runs = args.runs or Path(tempfile.mkdtemp(prefix="optimizers-"))
    results: dict[str, list[tuple]] = {label: [] for label in OPTIONS}
    run_seconds: dict[str, list[float]] = {label: [] for label in OPTIONS}
    for seed in args.seeds:  # a round per seed: every option at the same time
        jobs = {label: (runs / f"{option[0].split('=')[1]}-seed{seed}",
                        [*overrides(args, option, seed), *extra])
                for label, option in OPTIONS.items()}
        todo = [job for job in jobs.values() if not (job[0] / "metrics.json").is_file()]
        for _, argv in todo:  # completed runs in --runs are reused
            print(f"seed {seed}: trainrun {' '.join(argv)}", flush=True)
        train_together(todo)
        for label, (run_dir, _) in jobs.items():
            results[label].append(val_curve(run_dir))
            metrics = json.loads((run_dir / "metrics.json").read_text())
            run_seconds[label].append(metrics["wall_seconds"])
    rows = []
    for label, option in OPTIONS.items():
        argv = [*overrides(args, option, args.seeds[0]), *extra]
        params = sum(p.numel() * p.element_size() for p in _model(argv).parameters())
        row = summarize(args, label, results[label], state_bytes(argv), params)
        rows.append(row | {"run_seconds": statistics.mean(run_seconds[label])})
    plot(results, args.target, args.plot)
    print(table(rows, args.target))
    print(f"plot: {args.plot}; runs: {runs}")
    print(json.dumps(rows))


def _model(argv: list[str]) -> torch.nn.Module:
    from trainrun.composition import validated_configs
    from trainrun.data.tokenizers import ByteTokenizer

    (cfg,) = validated_configs([argv])
    return cfg.model.build(ByteTokenizer.vocab_size)


if __name__ == "__main__":
    main()
