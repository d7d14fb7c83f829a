"""Resuming a run (SPEC §7): which checkpoint to continue from, and whether the config
asked for may continue it.

`trainrun resume=<run dir>` re-composes the run's saved overrides (.hydra/overrides.yaml)
with the new ones on top and runs in that directory; `resume=auto` continues the run
directory of this very command when it holds a checkpoint, and starts fresh otherwise.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from trainrun import checkpoint
from trainrun.config import Config
from trainrun.errors import ConfigError

# What a resumed run may not change: the model's shape, the data, and the data order's seed.
SHAPE_KEYS = ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len")
DATA_KEYS_FREE = ("batch_size",)  # the order does not depend on it (SPEC §3)


def find(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest intact checkpoint of run_dir (None if there is none), and a warning for
    each newer one that is damaged."""
    warnings = []
    for path in reversed(checkpoint.complete(run_dir / "checkpoints")):
        problem = checkpoint.verify(path)
        if problem is None:
            return path, warnings
        warnings.append(f"checkpoint {path} is damaged ({problem}); using an older one")
    return None, warnings


def argv_for(run_dir: Path, argv: list[str]) -> list[str]:
    """The overrides that continue run_dir: its saved ones, then the new ones (the last
    value of a key wins), then the run directory itself."""
    from omegaconf import OmegaConf

    saved_file = run_dir / ".hydra" / "overrides.yaml"
    saved = list(OmegaConf.load(saved_file)) if saved_file.is_file() else []
    merged: dict[str, str] = {}
    for override in [*saved, *argv]:
        key = override.split("=", 1)[0].lstrip("+~")
        if key not in ("resume", "hydra.run.dir"):
            merged.pop(key, None)
            merged[key] = override
    return [*merged.values(), f"resume={run_dir}", f"hydra.run.dir={run_dir}"]


def check_compatible(cfg: Config, meta: dict, path: Path) -> None:
    """Refuse a config that changes what the checkpoint at `path` was trained with."""
    saved = meta["config"]
    now = asdict(cfg)
    changed = [f"model.{k}" for k in SHAPE_KEYS if saved["model"][k] != now["model"][k]]
    changed += [f"data.{k}" for k in saved["data"]
                if k not in DATA_KEYS_FREE and saved["data"].get(k) != now["data"].get(k)]
    changed += [f"data ({type(cfg.data).__name__})"] if saved.get("data_source") not in (
        None, type(cfg.data).__name__) else []
    if saved["trainer"]["seed"] != now["trainer"]["seed"]:
        changed.append("trainer.seed")
    if changed:
        key = changed[0]
        section, _, name = key.partition(".")
        old = saved.get(section, {}).get(name) if name else saved.get("data_source")
        raise ConfigError(
            key, f"the checkpoint {path.name} was trained with {old!r}; a resumed run keeps "
                 f"the model's shape, the data and the seed (allowed: {old!r})")


def locate(cfg: Config, run_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint this run continues from (None: start fresh) and warnings.

    resume=<dir> must hold an intact checkpoint; resume=auto may hold none.
    """
    if cfg.resume is None:
        return None, []
    path, warnings = find(run_dir)
    if path is None and cfg.resume != "auto":
        raise ConfigError("resume", f"{cfg.resume}: no intact checkpoint in "
                                    f"{run_dir / 'checkpoints'}; allowed: a run directory "
                                    f"with one, auto, or null")
    if path is not None:
        check_compatible(cfg, checkpoint.read_meta(path), path)
    return path, warnings
