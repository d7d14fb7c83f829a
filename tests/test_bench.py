"""scripts/bench.py (docs/performance.md): it runs, compares the same work, and its last line is one
JSON object with the documented keys. Its figures are not checked here: timings on a
shared machine are noise, and docs/performance.md reports measured ones."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO, TINY

pytestmark = pytest.mark.slow
KEYS = {"runner_tokens_per_s", "bare_tokens_per_s", "overhead_ratio", "mfu", "startup_s",
        "peak_mem_mb", "bare_peak_mem_mb", "device", "precision", "compile", "threads", "weights_max_rel_diff",
        "overrides"}


@pytest.mark.parametrize("extra", [[], ["trainer.grad_accum_steps=2", "clip=none"],
                                   ["data.streaming=true", "data.sample_by=line",
                                    "data.val_documents=20"]])
def test_bench_prints_one_json_object_last(tmp_path, corpus, extra):
    overrides = [*TINY, "data=text", f"data.files={corpus}", *extra]
    proc = subprocess.run([sys.executable, str(REPO / "scripts/bench.py"), *overrides,
                           "--updates", "2", "--pairs", "1", "--warmup", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result) == KEYS
    assert result["device"] == "cpu" and result["mfu"] is None
    assert result["runner_tokens_per_s"] > 0 and result["bare_tokens_per_s"] > 0
    assert result["overhead_ratio"] == pytest.approx(
        result["bare_tokens_per_s"] / result["runner_tokens_per_s"], rel=1e-2)
    assert result["startup_s"] > 0 and result["peak_mem_mb"] > 0
    # the bare loop did exactly the runner's work, in the same order: the same bits
    assert result["weights_max_rel_diff"] == 0
    assert any(line.startswith("overhead ratio") for line in lines[:-1])


def test_bench_refuses_a_bad_override_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts/bench.py"), "optimizer.lr=-1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("bench: error: optimizer.lr") and \
        len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name, bf16", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756.5e12),
    ("NVIDIA H100 NVL", 835.5e12), ("NVIDIA H200", 989.4e12), ("NVIDIA H200 NVL", 835.5e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA GeForce RTX 4090", None)])
def test_mfu_takes_the_peak_of_the_gpus_own_part(name, bf16):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from bench import peak_of
    finally:
        sys.path.pop(0)
    assert peak_of(name, "bf16") == bf16
