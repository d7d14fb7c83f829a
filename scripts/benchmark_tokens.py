"""Token storage at scale: tokenization throughput, token file sizes, and the peak resident
memory of a training run on a large corpus against the same run on a 20 MB one.

    python scripts/benchmark_tokens.py --size-mb 2048 --work /tmp/trainrun-bench

It writes a synthetic corpus (documents of Zipf-distributed made-up words, one per line, in
64 MB shards), tokenizes it with tokenizer=byte and tokenizer=bpe (vocab_size 8192) through
trainrun's own data code in fresh processes (their own caches under --work), then trains
gpt_tiny for --steps updates on the large and on the 20 MB corpus with each tokenizer and
reads each run's peak RSS (getrusage of the child process). It prints a Markdown table.
Besides the throughput (MB of text per second, wall clock), it gives the CPU seconds that
tokenizing the training split took (every thread, and the worker processes of a tokenizer
that encodes in processes) and the MB per CPU-second: on a machine
shared with other jobs the first moves with their load, the second much less.
--tokenize-only measures the large corpus's tokenization alone (no training runs, no small
corpus); --workers N passes data.tokenize_workers=N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARD_MB = 64
SMALL_MB = 20
CHUNK_WORDS = 200_000  # about 1.2 MB of text

TOKENIZE = """
import json, resource, sys, time
from trainrun import data
from trainrun.composition import validated_configs
from trainrun.data import storage
cfg = validated_configs([sys.argv[1:]])[0]
cpu, write_split = {}, storage.write_split

def used():  # every thread of the process, and its worker processes once ended
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (
        resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))

def timed(docs, tokenizer, folder, split, *args, **kwargs):  # the CPU time of each split
    before = used()
    record = write_split(docs, tokenizer, folder, split, *args, **kwargs)
    cpu[split] = used() - before
    return record

storage.write_split = timed
began = time.monotonic()
loaded = data.load(cfg.data, cfg.tokenizer, lambda line: print(line, flush=True))
seconds = time.monotonic() - began
folder = __import__("pathlib").Path(loaded.train.tokens.filename).parent
print("RESULT " + json.dumps({"seconds": seconds, "folder": str(folder), "cpu": cpu}))
"""


def make_corpus(folder: Path, size_mb: int, seed: int) -> Path:
    """size_mb of text in SHARD_MB shards: about 200 words per line (document)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = np.frombuffer(b"etaoinshrdlcumwfgypbvkjxqz", np.uint8)
    words = [bytes(letters[rng.integers(0, 26, rng.integers(1, 11))]) for _ in range(50_000)]
    pieces = np.array([w + b" " for w in words] + [w + b"\n" for w in words], dtype=object)
    weights = 1.0 / np.arange(1, len(words) + 1)  # Zipf's law
    weights /= weights.sum()
    target, written, shard = size_mb * 1_000_000, 0, 0
    while written < target:
        path = folder / f"shard-{shard:04d}.txt"
        with open(path, "wb") as out:
            size = 0
            while size < min(SHARD_MB * 1_000_000, target - written):
                idx = rng.choice(len(words), CHUNK_WORDS, p=weights)
                idx += len(words) * (rng.random(CHUNK_WORDS) < 1 / 200)  # end of document
                chunk = b"".join(pieces[idx])
                out.write(chunk)
                size += len(chunk)
        written += size
        shard += 1
    return folder


def child_peak_rss(cmd: list[str], env: dict, log: Path) -> tuple[float, int, str]:
    """Run cmd; its wall seconds, its peak resident memory (bytes) and its output."""
    wrapper = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
               "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); "
               "sys.exit(p.returncode)")
    began = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seconds = time.monotonic() - began
    log.write_text(proc.stdout)
    if proc.returncode != 0:
        sys.exit(f"failed ({log}):\n{proc.stdout[-3000:]}")
    peak = int(proc.stdout.rsplit("PEAK ", 1)[1].split()[0])
    return seconds, peak, proc.stdout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=Path("/tmp/trainrun-bench"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tokenizers", default="byte,bpe")
    parser.add_argument("--tokenize-only", action="store_true",
                        help="tokenize the large corpus only: no training, no small corpus")
    parser.add_argument("--workers", default=None,
                        help="data.tokenize_workers (default: the config's, auto)")
    args = parser.parse_args(argv)
    work = args.work
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / "hf-cache"),
           "TRAINRUN_CACHE": str(work / "trainrun-cache"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    corpora = {}
    sizes = [("large", args.size_mb, 0)] + ([] if args.tokenize_only else [("small", SMALL_MB, 1)])
    for name, size, seed in sizes:
        folder = work / f"corpus-{name}-{size}mb"
        if not folder.is_dir():
            began = time.monotonic()
            make_corpus(folder, size, seed)
            print(f"wrote {folder} in {time.monotonic() - began:.0f}s", flush=True)
        corpora[name] = folder
    bytes_large = sum(p.stat().st_size for p in corpora["large"].iterdir())
    tok_overrides = {"byte": ["tokenizer=byte"],
                     "bpe": ["tokenizer=bpe", "tokenizer.vocab_size=8192"]}
    rows = []
    for tok in args.tokenizers.split(","):
        for name, folder in corpora.items():
            overrides = ["data=text", f"data.files={folder}/*.txt", "data.sample_by=line",
                         *tok_overrides[tok]]  # its documents are the shards' lines
            if args.workers is not None:
                overrides.append(f"data.tokenize_workers={args.workers}")
            seconds, peak, out = child_peak_rss(
                [sys.executable, "-c", TOKENIZE, *overrides], env,
                work / f"tokenize-{tok}-{name}.log")
            result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
            info = json.loads((Path(result["folder"]) / "info.json").read_text())
            train = info["splits"]["train"]
            files = sum(p.stat().st_size for p in Path(result["folder"]).iterdir())
            t_seconds = t_peak = None
            if not args.tokenize_only:
                run_dir = work / f"run-{tok}-{name}"
                shutil.rmtree(run_dir, ignore_errors=True)
                t_seconds, t_peak, _ = child_peak_rss(
                    [shutil.which("trainrun") or "trainrun", *overrides,
                     f"trainer.max_steps={args.steps}", "trainer.eval_every=1000",
                     "trainer.ckpt_every=1000", "trainer.device=cpu", "precision=fp32",
                     f"hydra.run.dir={run_dir}"], env, work / f"train-{tok}-{name}.log")
            rows.append({
                "tokenizer": tok, "corpus": name,
                "text_mb": round(sum(p.stat().st_size for p in folder.iterdir()) / 1e6, 1),
                "load_s": round(result["seconds"], 1), "tokenize_s": train["seconds"],
                "mb_per_s": round(train["text_bytes"] / 1e6 / max(train["seconds"], 1e-9), 1),
                "tokens_per_s": round(train["tokens"] / max(train["seconds"], 1e-9)),
                # CPU seconds of all its threads: what other jobs on the machine do not change
                "tokenize_cpu_s": round(result["cpu"]["train"], 2),
                "mb_per_cpu_s": round(train["text_bytes"] / 1e6 / max(result["cpu"]["train"], 1e-9), 1),
                "load_average": round(os.getloadavg()[0], 2),
                "tokens": train["tokens"] + info["splits"]["validation"]["tokens"],
                "dtype": info["dtype"], "token_files_mb": round(files / 1e6, 1),
                "tokenize_peak_rss_mb": round(peak / 1e6),
                "train_s": None if t_seconds is None else round(t_seconds, 1),
                "train_peak_rss_mb": None if t_peak is None else round(t_peak / 1e6)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(result["folder"])  # the next measurement tokenizes anew
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[k]:,}" if isinstance(row[k], int) else str(row[k])
                                for k in keys) + " |")
    print(f"large corpus: {bytes_large / 1e6:,.0f} MB of text")


if __name__ == "__main__":
    main()
