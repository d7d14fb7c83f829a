"""What the tests share besides fixtures (those are in conftest.py): the real config composed
with Hydra's compose API, a small corpus written by the tests themselves, short in-process
runs, the real console script in a subprocess, TensorBoard readers and comparisons of
weights and states. Test modules import them: `from helpers import TINY, config, tiny`."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import OmegaConf, open_dict

from trainrun.composition import load, prepare_hydra, validated_configs
from trainrun.config import Config

REPO = Path(__file__).resolve().parents[1]

# A model and run small enough for a test to train in a second or two on a CPU.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
    "model.max_seq_len=64", "data.seq_len=32", "data.batch_size=4",
    "trainer.max_steps=20", "trainer.eval_every=10", "trainer.eval_sequences=8",
    "trainer.log_every=5", "trainer.device=cpu", "precision=fp32",
]

WORDS = ("the model learns a schedule of rates and every update counts tokens while "
         "gradients flow through layers of attention to predict the next byte").split()


def make_corpus(path: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """Lines (documents) of very different lengths: 1 to 60 words."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.choice([1, 2, 5, 20, 60])))
             for _ in range(n_docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


# a made-up language pair: each source word has one target word, and the target says the
# sentence's words in reverse order (a word mapping plus a reordering)
SOURCE_WORDS = [f"{c}{v}{e}" for c in "bdgkmp" for v in "aiu" for e in ("", "n")]
TARGET_WORDS = {w: f"{w[::-1].upper()}x" for w in SOURCE_WORDS}


def translate_rule(sentence: str) -> str:
    return " ".join(TARGET_WORDS[w] for w in reversed(sentence.split()))


def make_pairs(folder: Path, n: int = 600, seed: int = 0, splits: tuple[str, ...] = ("train",),
               lengths: tuple[int, int] = (2, 6)) -> Path:
    """folder/<split>.src and .tgt, n line-aligned pairs per split (n // 5 for valid and
    test), source sentences of random words and their translations by translate_rule."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        count = n if split == "train" else max(1, n // 5)
        src = [" ".join(rng.choice(SOURCE_WORDS) for _ in range(rng.randint(*lengths)))
               for _ in range(count)]
        (folder / f"{split}.src").write_text("".join(f"{s}\n" for s in src))
        (folder / f"{split}.tgt").write_text("".join(f"{translate_rule(s)}\n" for s in src))
    return folder


def pair_overrides(folder: Path, *overrides: str) -> list[str]:
    """A tiny translation run on make_pairs' files (train, and valid and test when written)."""
    valid = [f"data.{kind}_{side}_files={folder / f'{split}.{ext}'}"
             for split, kind in (("valid", "valid"), ("test", "test"))
             if (folder / f"{split}.src").exists()
             for side, ext in (("source", "src"), ("target", "tgt"))]
    return ["model=transformer_tiny", "data=parallel", f"data.source_files={folder / 'train.src'}",
            f"data.target_files={folder / 'train.tgt'}", *valid, "data.seq_len=48",
            "data.batch_size=16", "trainer.max_steps=4", "trainer.eval_every=2",
            "trainer.log_every=1", "trainer.eval_sequences=32", "trainer.threads=1",
            "scheduler=constant", "optimizer.lr=1e-3", *overrides]


def config(*overrides: str) -> Config:
    """The validated Config of `trainrun <overrides>`."""
    return validated_configs([list(overrides)])[0]


def model_config(*overrides: str):
    """The validated model section of `trainrun <overrides>`, whatever data it would train
    on (a translation family's are pairs, which the default data are not)."""
    return validated_configs([list(overrides)], data=False)[0].model


def train(run_dir: Path, *overrides: str) -> dict:
    """Run `trainrun <overrides>` in this process into run_dir; return metrics.json."""
    from trainrun import runner

    prepare_hydra()
    with initialize_config_module(config_module="trainrun.conf", version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides),
                            return_hydra_config=True)
        choices = {g: o for g, o in cfg.hydra.runtime.choices.items() if not g.startswith("hydra")}
        with open_dict(cfg):
            del cfg["hydra"]
        yaml = OmegaConf.to_yaml(cfg)
        runner.run_training(load(cfg), run_dir, yaml, choices)
    return json.loads((run_dir / "metrics.json").read_text())


def tiny(corpus: Path, *overrides: str) -> list[str]:
    """TINY on the test corpus, a document per line (make_corpus writes them so), then
    `overrides`."""
    return [*TINY, "data=text", f"data.files={corpus}", "data.sample_by=line", *overrides]


def scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar tag, in the order written, from the one folder
    of run_dir/tb that holds event files (tb/ itself, or a sweep job's tb/<overrides>/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (folder,) = {p.parent for p in (run_dir / "tb").rglob("events.out.tfevents.*")} or \
        {run_dir / "tb"}
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None,
        unset: tuple[str, ...] = ()):
    """Run the real `trainrun` console script in a subprocess (`unset`: variables of this
    process it does not get)."""
    full_env = {**{k: v for k, v in os.environ.items() if k not in unset},
                "PYTHONUNBUFFERED": "1", **(env or {})}
    exe = Path(sys.executable).with_name("trainrun")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "trainrun"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of the checkpoint `latest` names."""
    name = (run_dir / "checkpoints/latest").read_text().strip()
    return weights(run_dir / "checkpoints" / name / "model.safetensors")


def assert_identical(a: dict, b: dict) -> None:
    """Bit for bit, tensor by tensor."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def wait_for(predicate, timeout: float = 120) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def flat(state, prefix: str = "") -> dict[str, object]:
    """Every tensor and plain value of a nested state (an optimizer's), by its path."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in flat(value, f"{prefix}{i}.").items()}
    return {prefix: state}


def assert_same_state(a, b) -> None:
    """Two nested states hold the same values, tensors bit for bit."""
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for key, value in b.items():
        same = torch.equal(a[key], value) if isinstance(value, torch.Tensor) else a[key] == value
        assert same, key


def twins(cfg: Config):
    """A seeded GPT of cfg.model with trainrun's optimizer and schedule, and an identical copy
    for a reference optimizer: (model, optimizer, schedule, copy)."""
    from trainrun.data.tokenizers import ByteTokenizer
    from trainrun.models import GPT
    from trainrun.optimizers import build_optimizer
    from trainrun.schedules import build_schedule

    torch.manual_seed(0)
    model = GPT(cfg.model, ByteTokenizer.vocab_size)
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    schedule = build_schedule(cfg.scheduler, cfg.optimizer.lr, cfg.trainer.max_steps)
    return model, optimizer, schedule, reference


def same_gradients(model: torch.nn.Module, reference: torch.nn.Module,
                   gen: torch.Generator) -> None:
    """Random gradients, the same on both models."""
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()


def small_tmpfs_works(where: Path) -> bool:
    """Can this machine mount a tmpfs in a new user and mount namespace (no root needed on
    most Linux systems; refused in some containers)?"""
    where.mkdir()
    try:
        probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                                f"mount -t tmpfs -o size=64k tmpfs {where}"],
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0
