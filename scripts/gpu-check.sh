#!/usr/bin/env bash
# Every CUDA check of trainrun in one go (README "Performance"): the tests marked `cuda`,
# then scripts/bench.py on gpt_small and gpt2_124m in fp32, bf16 and fp16, without and with
# torch.compile, and a table of the results. Under 10 minutes on one H100.
#
#   scripts/gpu-check.sh                 # in the repository root, on a machine with a GPU
#
# A machine without hydra-core, omegaconf or datasets: download their wheels where pip
# reaches the index, `pip download -d .wheels hydra-core omegaconf datasets rich tensorboard
# safetensors matplotlib tokenizers`, bring .wheels/ along, and this script installs them
# from there (--no-index) before it starts.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$(mktemp -d)}"

if ! python -c "import hydra, omegaconf, datasets" 2>/dev/null; then
    pip install -q --no-index --find-links .wheels hydra-core omegaconf datasets rich \
        tensorboard safetensors matplotlib tokenizers
fi
pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || pip install -q --no-deps -e .
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"

echo "== CUDA tests"
python -m pytest -q -m cuda -p no:cacheprovider 2>&1 | tail -n 15 | tee "$out/cuda-tests.txt"

echo "== benchmark"
models=("model=gpt_small data.seq_len=512 data.batch_size=32"
        "model=gpt2_124m data.seq_len=1024 data.batch_size=16")
: > "$out/bench.jsonl"
for model in "${models[@]}"; do
    for precision in fp32 bf16 fp16; do
        for compile in false true; do
            # shellcheck disable=SC2086  # the model's overrides are words
            python scripts/bench.py $model precision=$precision trainer.compile=$compile \
                trainer.device=cuda --updates 10 --pairs 3 --warmup 5 \
                | tail -n 1 >> "$out/bench.jsonl" \
                || echo "{\"failed\": \"$model precision=$precision compile=$compile\"}" >> "$out/bench.jsonl"
        done
    done
done
python - "$out/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
print(f"{'model':<12}{'precision':<10}{'compile':<9}{'runner tok/s':>14}{'bare tok/s':>14}"
      f"{'overhead':>10}{'MFU':>8}{'start-up s':>12}{'peak MB':>10}")
for r in rows:
    if "failed" in r:
        print(f"FAILED: {r['failed']}")
        continue
    model = next(o.split("=")[1] for o in r["overrides"] if o.startswith("model="))
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    print(f"{model:<12}{r['precision']:<10}{str(r['compile']):<9}{r['runner_tokens_per_s']:>14,.0f}"
          f"{r['bare_tokens_per_s']:>14,.0f}{r['overhead_ratio']:>10.3f}{mfu:>8}"
          f"{r['startup_s']:>12.1f}{r['peak_mem_mb']:>10,.0f}")
PY
