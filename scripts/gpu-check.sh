#!/usr/bin/env bash
# Every CUDA check of trainrun in one command, for a short slot on a GPU machine
# (docs/performance.md): under 8 minutes on one H100 or H200 by default.
#
#   scripts/gpu-check.sh [--full] [--wheels DIR] [--out DIR]
#
# What it needs: this repository, and Python (3.10 or newer) with a CUDA build of torch
# (2.11 or newer) installed; torch is left as it is. trainrun's other requirements come
# from a package index, or with --wheels DIR from wheels for this machine's Python and
# platform that scripts/gpu-wheels.sh downloads elsewhere (a machine without network).
#
# Stages, each run whatever became of the ones before, each one's whole output kept in
# OUT/<stage>.txt:
#   env      Python, torch, CUDA and the GPU
#   install  trainrun, without touching torch
#   tests    the tests marked cuda (pytest -m cuda)
#   run      a real `trainrun` run on the GPU (the default model and data, 200 updates)
#   bench    scripts/bench.py: runner against a bare loop, MFU, start-up, memory
#            (5 rows; --full: 12, which takes longer)
# OUT/summary.md gains a line as each stage ends, so a slot that ends early still leaves
# what ran; it is printed at the end. OUT is ./gpu-check-<date>-<time> unless --out.
set -uo pipefail
cd "$(dirname "$0")/.."

full=0 wheels="" out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --full) full=1 ;;
        --wheels) wheels="$2"; shift ;;
        --out) out="$2"; shift ;;
        -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
out="${out:-gpu-check-$(date +%Y-%m-%d-%H-%M-%S)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.md"
echo "gpu-check: results in $out"
printf '# gpu-check %s\n\n| stage | status | seconds | result |\n|---|---|---|---|\n' \
    "$(date -Iseconds)" > "$summary"

# stage NAME RESULT_COMMAND -- COMMAND...: run COMMAND with its output in OUT/NAME.txt,
# then add its row to the summary (RESULT_COMMAND prints the row's result from that file)
stage() {
    local name="$1" result="$2"; shift 3
    local start=$SECONDS status
    echo "== $name"
    "$@" > "$out/$name.txt" 2>&1
    status=$?
    local shown
    shown="$($result "$out/$name.txt" 2>/dev/null | tr '\n|' ' /' | cut -c1-160)"
    printf '| %s | %s | %s | %s |\n' "$name" "$([ $status = 0 ] && echo ok || echo "FAILED ($status)")" \
        "$((SECONDS - start))" "$shown" >> "$summary"
    tail -n 3 "$out/$name.txt"
    return 0
}
last_line() { tail -n 1 "$1"; }
tests_line() { grep -E '(passed|failed|error|skipped)' "$1" | tail -n 1; }
run_line() { grep -E '^(done|trainrun: )' "$1" | tail -n 1; }

env_report() {
    python - <<'PY'
import platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
print(f"GPUs: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported(including_emulation=False)}")
assert torch.cuda.is_available(), "no CUDA GPU: this script checks the CUDA paths"
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
PY
}

install() {
    if [ -n "$wheels" ]; then
        python -m pip install --no-index --find-links "$wheels" --no-build-isolation -e .
    else
        python -m pip install -e .
    fi && python -m pip show trainrun torch hydra-core datasets pytest | grep -E '^(Name|Version)' \
        && python -c "import trainrun, hydra, datasets, schedulefree, pytest; print('trainrun installed')"
}

cuda_tests() {
    python -m pytest -m cuda -p no:cacheprovider -rA --durations=10 tests
}

real_run() {
    python -m trainrun trainer.device=cuda trainer.max_steps=200 trainer.eval_every=100 \
        "hydra.run.dir=$out/run"
}

bench() {
    local rows=("model=gpt_small data.seq_len=512 data.batch_size=32 precision=fp32 trainer.compile=false"
                "model=gpt_small data.seq_len=512 data.batch_size=32 precision=bf16 trainer.compile=false"
                "model=gpt_small data.seq_len=512 data.batch_size=32 precision=fp16 trainer.compile=false"
                "model=gpt2_124m data.seq_len=1024 data.batch_size=16 precision=bf16 trainer.compile=false"
                "model=gpt2_124m data.seq_len=1024 data.batch_size=16 precision=bf16 trainer.compile=true"
                "model=llama_small data.seq_len=512 data.batch_size=32 precision=bf16 trainer.compile=false"
                "model=smollm_135m data.seq_len=1024 data.batch_size=16 precision=bf16 trainer.compile=false")
    if [ "$full" = 1 ]; then
        rows=()
        for model in "model=gpt_small data.seq_len=512 data.batch_size=32" \
                     "model=gpt2_124m data.seq_len=1024 data.batch_size=16" \
                     "model=llama_small data.seq_len=512 data.batch_size=32" \
                     "model=smollm_135m data.seq_len=1024 data.batch_size=16"; do
            for precision in fp32 bf16 fp16; do
                for compile in false true; do
                    rows+=("$model precision=$precision trainer.compile=$compile")
                done
            done
        done
    fi
    : > "$out/bench.jsonl"
    local failed=0
    for row in "${rows[@]}"; do
        echo "-- $row"
        # shellcheck disable=SC2086  # a row's overrides are words
        if python scripts/bench.py $row trainer.device=cuda --updates 10 --pairs 3 --warmup 5 \
                > "$out/bench-row.txt" 2>&1; then
            tail -n 1 "$out/bench-row.txt" >> "$out/bench.jsonl"
        else
            echo "{\"failed\": \"$row\"}" >> "$out/bench.jsonl"
            failed=$((failed + 1))
        fi
        cat "$out/bench-row.txt"
        bench_table > "$out/bench.md"  # row by row: a slot that ends keeps the rows so far
    done
    rm -f "$out/bench-row.txt"
    cat "$out/bench.md"
    return "$failed"
}

bench_table() {
    python - "$out/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("| model | precision | compile | runner tok/s | bare tok/s | overhead | MFU | start-up s "
      "| runner MB | bare MB |\n|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "failed" in r:
        print(f"| FAILED: {r['failed']} |||||||||")
        continue
    model = next(o.split("=")[1] for o in r["overrides"] if o.startswith("model="))
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    bare = "n/a" if r.get("bare_peak_mem_mb") is None else f"{r['bare_peak_mem_mb']:,.0f}"
    print(f"| {model} | {r['precision']} | {r['compile']} | {r['runner_tokens_per_s']:,.0f} | "
          f"{r['bare_tokens_per_s']:,.0f} | {r['overhead_ratio']:.3f} | {mfu} | "
          f"{r['startup_s']:.1f} | {r['peak_mem_mb']:,.0f} | {bare} |")
PY
}
bench_count() { grep -c '^|' "$out/bench.md" 2>/dev/null | awk '{print $1 - 2 " rows in bench.md"}'; }
# the wheels --wheels takes: scripts/gpu-wheels.sh

stage env last_line -- env_report
stage install last_line -- install
stage tests tests_line -- cuda_tests
stage run run_line -- real_run
stage bench bench_count -- bench
{ echo; [ -f "$out/bench.md" ] && cat "$out/bench.md"; } >> "$summary"
echo
cat "$summary"
echo "gpu-check: every stage's output is in $out"
