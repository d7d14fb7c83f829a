"""Streaming at scale: the resident memory of a data.streaming=true run over corpora of
several sizes, through the run, against the same run on token files.

    python scripts/benchmark_stream.py --sizes 1,20,200 --steps 300 --work /tmp/trainrun-bench

It writes synthetic corpora as scripts/benchmark_tokens.py does (documents of Zipf-distributed
made-up words, one per line, in 64 MB shards), then trains a small GPT (--model: the data is
measured, not the model) on each, streaming and
(--token-files) from token files, each run in a fresh process with caches of its own. It reads
the process's resident memory (VmRSS in /proc) as each progress line appears, its peak (VmHWM)
at the end, and what the run left in its caches, and prints a Markdown table.

A few hundred updates read only the start of a large corpus; --read-through reads each corpus
through instead, with no model: a fresh process loads the data as a run does and takes the
stream's windows (data.batch_size rows each, batch() called on each as the loop does) until
the stream enters its second epoch, or (--token-files) builds the token files and takes one
epoch of windows from them, sampling its resident memory every 1% of the corpus's rows:

    python scripts/benchmark_stream.py --read-through --sizes 1,20,200 --token-files
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmark_tokens import make_corpus

STEP = re.compile(r"^step (\d+)/")


def memory(pid: int, field: str) -> int:
    """VmRSS or VmHWM of process pid, in bytes (0 once it has ended)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) * 1024


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(cmd: list[str], env: dict, log: Path) -> tuple[float, dict[int, int], int, str]:
    """Run cmd; its wall seconds, its RSS at each update it logs, its peak RSS, its output."""
    began, at_step, peak, lines = time.monotonic(), {}, 0, []
    proc = subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    for line in proc.stdout:
        lines.append(line)
        if match := STEP.match(line):
            at_step[int(match.group(1))] = memory(proc.pid, "VmRSS")
        peak = max(peak, memory(proc.pid, "VmHWM"))
    proc.wait()
    log.write_text("".join(lines))
    if proc.returncode != 0:
        sys.exit(f"failed ({log}):\n{''.join(lines)[-3000:]}")
    return time.monotonic() - began, at_step, peak, "".join(lines)


def epochs_read(run_dir: Path) -> int | None:
    """The epoch the stream had reached at the run's last checkpoint."""
    import torch

    name = (run_dir / "checkpoints/latest").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / name / "trainer_state.pt", weights_only=True)
    return state["order"].get("epoch") if state["order"].get("stream") else None


def read_through(args) -> None:
    """In this (fresh) process: load the data as a run does, take its windows over one whole
    epoch, print one JSON line of what was read and the resident memory along the way."""
    import numpy as np

    from trainrun import data
    from trainrun.builders import order_of
    from trainrun.composition import validated_configs

    streaming = args.read_through_mode == "stream"
    began = time.monotonic()
    (cfg,) = validated_configs([[
        "data=text", f"data.files={args.read_through_corpus}/*.txt", "data.sample_by=line",
        f"data.streaming={str(streaming).lower()}", "data.val_documents=200",
        f"data.batch_size={args.batch_size}", "trainer.device=cpu", "precision=fp32",
        *args.model.split()]])
    loaded = data.load(cfg.data, cfg.tokenizer)
    order = order_of(loaded.train, 0)
    size = args.batch_size
    samples, rows, expected = [], 0, None
    if not streaming:
        expected = len(loaded.train)
    every = max(1, (expected or args.read_through_rows) // 100 // size)
    windows = 0
    while True:
        ix = order.next_window(size)
        if streaming and order.epoch > 0:
            break
        loaded.train.batch(ix)
        rows, windows = rows + size, windows + 1
        if windows % every == 0:
            samples.append(memory(os.getpid(), "VmRSS"))
        if not streaming and rows + size > expected:
            break
    if hasattr(order, "close"):
        order.close()
    third = len(samples) // 3
    print(json.dumps({"rows": rows, "tokens": rows * cfg.data.seq_len,
                      "rss_first_third_mb": round(max(samples[:third] or samples) / 1e6),
                      "rss_last_third_mb": round(max(samples[-third:] or samples) / 1e6),
                      "rss_median_mb": round(float(np.median(samples)) / 1e6),
                      "peak_rss_mb": round(memory(os.getpid(), "VmHWM") / 1e6),
                      "samples": len(samples), "wall_s": round(time.monotonic() - began, 1)}))


def corpora(args):
    """(size in MB, folder, MB of text) of each --sizes corpus, written the first time."""
    for size in map(int, args.sizes.split(",")):
        corpus = args.work / f"corpus-stream-{size}mb"
        if not corpus.is_dir():
            make_corpus(corpus, size, seed=size)
        yield size, corpus, folder_bytes(corpus) / 1e6


def read_through_all(args) -> None:
    """--read-through: each corpus read through, each in a fresh process with its caches."""
    rows = []
    for size, corpus, text_mb in corpora(args):
        for mode in (["stream", "files"] if args.token_files else ["stream"]):
            name = f"read-{mode}-{size}mb"
            caches = args.work / f"caches-{name}"
            shutil.rmtree(caches, ignore_errors=True)
            env = {**os.environ, "HF_DATASETS_CACHE": str(caches / "hf"),
                   "TRAINRUN_CACHE": str(caches / "trainrun"), "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
            # rows of 129 tokens each starting on the last of the one before: ~1 per 128 bytes
            proc = subprocess.run(
                [sys.executable, __file__, "--read-through-corpus", str(corpus),
                 "--read-through-mode", mode, "--read-through-rows", str(int(text_mb * 1e6 / 128)),
                 "--batch-size", str(args.batch_size), "--model", args.model],
                env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"failed: {proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"data": "stream" if mode == "stream" else "token files",
                         "text_mb": round(text_mb, 1), **result,
                         "cache_written_mb": round(folder_bytes(caches) / 1e6, 1)
                         if caches.exists() else 0.0})
            print(json.dumps(rows[-1]), flush=True)
    (args.work / "stream-read-through.json").write_text(json.dumps(rows, indent=2) + "\n")
    table(rows)


def table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:,}" if isinstance(row[k], int) else str(row[k])
                                for k in keys) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--read-through", action="store_true",
                        help="read each corpus through, with no model (see above)")
    parser.add_argument("--read-through-corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--read-through-mode", help=argparse.SUPPRESS)
    parser.add_argument("--read-through-rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="1,20,200", help="corpus sizes in MB")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="model.d_model=64 model.n_layers=2 model.n_heads=2 "
                        "model.d_ff=256", help="overrides of gpt_tiny (the data is measured, "
                        "not the model)")
    parser.add_argument("--token-files", action="store_true",
                        help="also train on token files (data.streaming=false)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/trainrun-bench"))
    args = parser.parse_args(argv)
    if args.read_through_corpus is not None:
        read_through(args)
        return
    if args.read_through:
        read_through_all(args)
        return
    rows = []
    for size, corpus, text_mb in corpora(args):
        for streaming in ([True, False] if args.token_files else [True]):
            name = f"{'stream' if streaming else 'files'}-{size}mb"
            caches = args.work / f"caches-{name}"
            shutil.rmtree(caches, ignore_errors=True)
            env = {**os.environ, "HF_DATASETS_CACHE": str(caches / "hf"),
                   "TRAINRUN_CACHE": str(caches / "trainrun"), "HF_HUB_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
            run_dir = args.work / f"run-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            seconds, at_step, peak, _ = run(
                [shutil.which("trainrun") or str(Path(sys.executable).with_name("trainrun")), "data=text",
                 f"data.files={corpus}/*.txt", "data.sample_by=line",
                 f"data.streaming={str(streaming).lower()}", "data.val_documents=200",
                 f"data.batch_size={args.batch_size}", f"trainer.max_steps={args.steps}",
                 f"trainer.log_every={max(1, args.steps // 6)}", "trainer.eval_every=100000",
                 "trainer.eval_sequences=64", "trainer.ckpt_every=100000", "trainer.device=cpu",
                 "precision=fp32", *args.model.split(), f"hydra.run.dir={run_dir}"], env, args.work / f"{name}.log")
            steps = sorted(at_step)
            metrics = json.loads((run_dir / "metrics.json").read_text())
            rows.append({
                "data": "stream" if streaming else "token files", "text_mb": round(text_mb, 1),
                "updates": args.steps, "tokens_trained": metrics["tokens"],
                "epochs_begun": (epochs_read(run_dir) or 0) + 1 if streaming else "-",
                "rss_first_mb": round(at_step[steps[0]] / 1e6),
                "rss_middle_mb": round(at_step[steps[len(steps) // 2]] / 1e6),
                "rss_last_mb": round(at_step[steps[-1]] / 1e6),
                "peak_rss_mb": round(peak / 1e6),
                "cache_written_mb": round(folder_bytes(caches) / 1e6, 1) if caches.exists()
                else 0.0,
                "wall_s": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    (args.work / "stream-results.json").write_text(json.dumps(rows, indent=2) + "\n")
    table(rows)


if __name__ == "__main__":
    main()
