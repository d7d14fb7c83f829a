"""Resuming a run (docs/design.md, Resume and signals): which checkpoint to continue from,
whether the config asked for may continue it, and the command that continues a run.

`trainrun resume=<run dir>` re-composes the run's saved overrides (.hydra/overrides.yaml,
checked and merged by trainrun.composition.overrides) with the new ones on top and runs in that
directory; `resume=auto` continues the run directory of this very command when it holds a
checkpoint, and starts fresh otherwise.
"""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainrun import checkpoint
from trainrun.config import GROUPS, Config
from trainrun.data import RUN_FILE
from trainrun.errors import ConfigError, reason, require_positive
from trainrun.models import family_of
from trainrun.schedules import Schedule, build_schedule
from trainrun.threads import MAX_THREADS

# What a resumed run may not change: the model's family and its shape (the family's
# shape_keys), the data and the data order's seed, and the optimizer (its state would not fit).
# the order does not depend on them (docs/design.md, Data), nor the tokens on the workers
DATA_KEYS_FREE = ("batch_size", "tokenize_workers")
OPTIMIZER_GROUP_KEYS = ("no_decay", "exclude")  # they decide the parameter groups
PLAIN = re.compile(r"[A-Za-z0-9_./-]*/[A-Za-z0-9_./-]*")  # a path Hydra reads as itself
# Keys that came after runs were recorded without them, by (section, schema): the value such
# a run had, where it is not today's default. Before data.sample_by, a .txt file was read
# as a document per line.
EARLIER = {("data", "TextDataConfig"): {"sample_by": "line"}}
# Data keys of every data option that came after runs were recorded without them, and the
# value those runs had (their default): a resume may not set another.
LATER_DATA = {"document_mask": False}


class AlreadyComplete(Exception):
    """resume= names a run that has reached trainer.max_steps: nothing to do, nothing is
    changed (the command ends with status 0)."""


def quote(value: str) -> str:
    """`value` as an override value that Hydra's grammar and OmegaConf read back unchanged:
    as it is when it is a plain path, else double-quoted with quotes, backslashes before a
    quote or the end, and `${` escaped (commas, brackets, `=`, spaces and non-ASCII are then
    safe)."""
    if PLAIN.fullmatch(value):
        return value
    escaped = re.sub(r'(\\*)(\$\{|"|$)',
                     lambda m: m.group(1) * 2 + ("\\" + m.group(2) if m.group(2) else ""), value)
    return f'"{escaped}"'


def command(run_dir: Path, config_dir: str | Path | None = None) -> str:
    """The shell command that continues run_dir (started with `--config-dir config_dir`),
    ready to copy."""
    folder = f"--config-dir {shlex.quote(str(config_dir))} " if config_dir else ""
    return f"trainrun {folder}{shlex.quote('resume=' + quote(str(run_dir)))}"


def find(run_dir: Path) -> tuple[Path | None, dict[Path, str]]:
    """The newest intact checkpoint of run_dir (None if there is none), and what is wrong
    with each newer one that is damaged."""
    damaged = {}
    for path in reversed(checkpoint.complete(run_dir / "checkpoints")):
        problem = checkpoint.verify(path)
        if problem is None:
            return path, damaged
        damaged[path] = problem
    return None, damaged


def set_aside(damaged: dict[Path, str]) -> list[str]:
    """Rename damaged checkpoints to .damaged-<name>, out of `latest`'s and pruning's way, so
    that the resumed run writes them anew; return a warning for each."""
    warnings = []
    for path, problem in damaged.items():
        aside = path.with_name(f".damaged-{path.name}")
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        warnings.append(f"checkpoint {path} is damaged ({problem}); moved to {aside.name}, "
                        f"resuming from an older one")
    return warnings


def schemas(cfg: Config) -> dict[str, str]:
    """The schema (group option; the model's family) of each section, for meta.json."""
    return {section: type(getattr(cfg, section)).__name__
            for section in ("model", "data", "tokenizer", "optimizer")}


def saved_schemas(meta: dict) -> dict[str, str]:
    """meta.json's schemas; older runs recorded none for the tokenizer (bytes then) nor the
    model (GPT-2's then)."""
    return {"tokenizer": "ByteConfig", "model": "GPTConfig", **meta["schemas"]}


def tokenizer_record(tokenizer) -> dict:
    """meta.json's `tokenizer`: its fingerprint, and the run's copy of it (if any)."""
    return {"fingerprint": tokenizer.fingerprint(),
            "file": RUN_FILE if hasattr(tokenizer, "to_str") else None}


def check_tokenizer(tokenizer, path: Path) -> None:
    """Refuse a tokenizer whose ids differ from those the checkpoint at `path` learnt
    (same options, but e.g. another tokenizer.json at tokenizer.path)."""
    saved = checkpoint.read_meta(path).get("tokenizer", {"fingerprint": "byte"})
    if saved["fingerprint"] != tokenizer.fingerprint():
        raise ConfigError("tokenizer", f"gives other ids than the tokenizer the checkpoint "
                                       f"{path.name} was trained with; allowed: that tokenizer "
                                       f"(the run's copy: {path.parent.parent / RUN_FILE})")


def data_record(train, validation) -> dict:
    """meta.json's `data`: each split's documents' fingerprint, the sha256 of its token file
    and its number of tokens (Sequences.record)."""
    return {"train": train.record, "validation": validation.record}


def check_data(record: dict, path: Path) -> None:
    """Refuse to continue on other tokens than the checkpoint at `path` was trained on: a
    resumed run is exact, and these would be other data under the same settings (a file
    edited, even at the same size and time). Checkpoints from before the record pass."""
    saved = checkpoint.read_meta(path).get("data") or {}
    if not isinstance(saved, dict):
        raise ConfigError("resume", f"{path / checkpoint.META_FILE}: not a meta.json that "
                                    f"trainrun wrote (data: {saved!r}); allowed: a checkpoint "
                                    f"written by trainrun")
    for split in ("train", "validation"):
        old, new = saved.get(split), record.get(split)
        if not (isinstance(old, dict) and new) or old.get("tokens") == new["tokens"]:
            continue
        why = ("its documents changed" if old.get("documents") != new["documents"] else
               "it was tokenized differently (another version of datasets or trainrun?)")
        if "stream" in new:  # no token file: the source and the tokenizer name it
            raise ConfigError("data", f"the {split} stream ({new['stream']}) is not the one "
                                      f"checkpoint {path.name} was trained on: "
                                      f"{why if 'stream' in old else 'that was no stream'}; "
                                      f"allowed: that data, as it was, or a new run from these "
                                      f"weights (trainrun-export, then model.init_from)")
        then = old.get("count")
        then = f"{then:,}" if isinstance(then, int) else "?"
        raise ConfigError("data", f"the {split} split is not the one checkpoint {path.name} "
                                  f"was trained on: {why}; {then} tokens then, "
                                  f"{new['count']:,} now; allowed: that data, as it was "
                                  f"(a resumed run continues on the same tokens), or a new run "
                                  f"from these weights (trainrun-export, then model.init_from)")
    old = (saved.get("train") or {}).get("batching")
    new = (record.get("train") or {}).get("batching")
    if isinstance(old, str) and new is not None and old != new:  # translation's buckets
        raise ConfigError("data", f"the training pairs are batched otherwise than in checkpoint "
                                  f"{path.name} (data.max_tokens, data.batch_size, "
                                  f"data.max_source_len, data.max_target_len or trainer.seed "
                                  f"changed); allowed: the checkpoint's, so that the run "
                                  f"continues on the same batches")


def reproducibility(path: Path | None) -> dict:
    """meta.json's `reproducibility` of checkpoint `path` (determinism.record; checked by
    check_recorded): {} for a fresh run, or a checkpoint from before the record."""
    return {} if path is None else checkpoint.read_meta(path).get("reproducibility", {})


def threads(saved: dict, processes: int) -> int | None:
    """The CPU threads a resume takes under trainer.threads=auto: those the checkpoint's run
    used, when it had as many processes (on another number the bits differ anyway, and the
    cores are shared otherwise)."""
    return saved.get("threads") if saved.get("processes") == processes else None


def option(section: str, schema_name: str) -> str:
    """`optimizer=adamw` for the schema AdamWConfig: an option as the user names it."""
    names = [name for name, schema in GROUPS.get(section, {}).items()
             if schema.__name__ == schema_name]
    return f"{section}={names[0]}" if names else schema_name


def recorded(meta: dict) -> dict:
    """meta.json's config, with the values of EARLIER for keys recorded before they came."""
    saved = dict(meta["config"])
    for (section, schema), values in EARLIER.items():
        if meta["schemas"].get(section) == schema:
            saved[section] = {**values, **saved[section]}
    return saved


def earlier(run_dir: Path) -> list[str]:
    """Overrides that give a run recorded before a key of EARLIER existed the value it had
    then (its newest checkpoint's meta.json says), for the commands that continue or read
    it; none where that meta.json is unreadable (resume.locate refuses it later)."""
    try:
        meta = checkpoint.read_meta(checkpoint.complete(run_dir / "checkpoints")[-1])
        return [f"{section}.{k}={v}" for (section, schema), values in EARLIER.items()
                if meta["schemas"][section] == schema
                for k, v in values.items() if k not in meta["config"][section]]
    except (IndexError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def check_compatible(cfg: Config, meta: dict, path: Path) -> None:
    """Refuse a config that changes what the checkpoint at `path` was trained with."""
    saved, now = recorded(meta), asdict(cfg)
    check_family(cfg, meta, path)
    changed = [(key, option(key, saved_schema)) for key, saved_schema in
               saved_schemas(meta).items() if saved_schema != schemas(cfg)[key]]
    changed += [(f"model.{k}", saved["model"][k]) for k in cfg.model.shape_keys
                if saved["model"].get(k) != now["model"][k]]
    changed += [(f"data.{k}", v) for k, v in saved["data"].items()
                if k not in DATA_KEYS_FREE and _unweighted(k, v) != _unweighted(
                    k, now["data"].get(k))]
    changed += [(f"data.{k}", v) for k, v in LATER_DATA.items()
                if k not in saved["data"] and now["data"].get(k, v) != v]
    changed += [(f"tokenizer.{k}", v) for k, v in saved.get("tokenizer", {}).items()
                if v != now["tokenizer"].get(k)]
    changed += [(f"optimizer.{k}", v) for k, v in saved["optimizer"].items()
                if k in OPTIMIZER_GROUP_KEYS and v != now["optimizer"].get(k)]
    if saved["trainer"]["seed"] != now["trainer"]["seed"]:
        changed.append(("trainer.seed", saved["trainer"]["seed"]))
    if saved["trainer"].get("strategy", "ddp") != now["trainer"]["strategy"]:  # sharded or not
        changed.append(("trainer.strategy", saved["trainer"].get("strategy", "ddp")))
    if changed:
        key, old = changed[0]
        old = old if isinstance(old, str) and "=" in old else repr(old)
        raise ConfigError(
            key, f"the checkpoint {path.name} was trained with {old}; a resumed run keeps "
                 f"the model's shape, the data, the tokenizer, the seed, the optimizer and "
                 f"the strategy (allowed: {old})")


def _unweighted(key: str, value):
    """A data key's value as a resume compares it: a mixture's sources without their
    weights, which a resume may change (the draws after it follow them)."""
    if key != "sources" or not isinstance(value, dict):
        return value
    return {name: {k: v for k, v in entry.items() if k != "weight"}
            if isinstance(entry, dict) else entry for name, entry in value.items()}


def check_family(cfg: Config, meta: dict, path: Path) -> None:
    """Refuse a model of another family than the checkpoint's, naming both."""
    old, new = family_of(saved_schemas(meta)["model"]), cfg.model.family
    if old != new:
        raise ConfigError("model", f"the checkpoint {path.name} holds a model of family {old}, "
                                   f"the run chooses one of family {new}; a resumed run keeps "
                                   f"its model family (allowed: a model option of family {old}, "
                                   f"as the run was started with)")


def check_steps(cfg: Config, step: int, run_dir: Path) -> None:
    """A resume trains on from update `step` up to trainer.max_steps: fewer is refused, as
    many is a run already complete."""
    if step > cfg.trainer.max_steps:
        raise ConfigError("trainer.max_steps", f"got {cfg.trainer.max_steps}, but {run_dir} "
                                               f"has reached update {step}; allowed: "
                                               f"trainer.max_steps > {step} to train longer")
    if step == cfg.trainer.max_steps:
        raise AlreadyComplete(f"{run_dir} is already complete at update {step}; raise "
                              f"trainer.max_steps to continue (nothing was changed)")


def schedule_notes(cfg: Config, meta: dict, k: int, schedule: Schedule) -> list[str]:
    """A resume with another max_steps (or optimizer.lr) re-shapes a decaying schedule from
    update k + 1 on: the lr the run used at update k, and the one it uses now."""
    old_steps, old_lr = meta["config"]["trainer"]["max_steps"], meta["config"]["optimizer"]["lr"]
    if (old_steps, old_lr) == (cfg.trainer.max_steps, cfg.optimizer.lr):
        return []
    old = build_schedule(cfg.scheduler, old_lr, old_steps, cfg.model.d_model)
    old.evals = list(schedule.evals)
    before, after = old(k), schedule(k + 1)
    factor = f"x{after / before:.3g}" if before > 0 else "from 0"
    return [f"the schedule now spans {cfg.trainer.max_steps} updates (was {old_steps}): lr at "
            f"update {k} was {before:.4g}, at update {k + 1} it is {after:.4g} ({factor}); "
            f"docs/long-jobs.md \"Train longer\""]


def locate(cfg: Config, run_dir: Path) -> tuple[Path | None, dict[Path, str]]:
    """The checkpoint this run continues from (None: start fresh) and the damaged ones.

    resume=<dir> must hold an intact checkpoint; resume=auto may hold none, but not only
    damaged ones: starting afresh there would write a second history over the run's
    (TensorBoard's steps 1..N twice, its checkpoints replaced).
    """
    if cfg.resume is None:
        return None, {}
    path, damaged = find(run_dir)
    if path is None and damaged:
        newest, problem = next(iter(damaged.items()))
        raise ConfigError("resume", f"{cfg.resume}: no intact checkpoint in "
                                    f"{run_dir / 'checkpoints'}: {newest.name} is damaged "
                                    f"({problem}); allowed: that checkpoint restored, or a "
                                    f"fresh run in another hydra.run.dir (nothing was changed)")
    if path is None and cfg.resume != "auto":
        raise ConfigError("resume", f"{cfg.resume}: no intact checkpoint in "
                                    f"{run_dir / 'checkpoints'}; allowed: a run directory "
                                    f"with one, auto, or null")
    if path is not None:
        try:
            meta = checkpoint.read_meta(path)
            step = meta["step"]
            if type(step) is not int or step != checkpoint.step_number(path):
                raise ValueError(f"step {step!r} in the checkpoint of update "
                                 f"{checkpoint.step_number(path)}")
            check_recorded(cfg, meta)
            check_compatible(cfg, meta, path)
        except ConfigError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # edited by hand
            what = f"bad or missing {exc}" if not isinstance(exc, ValueError) else exc
            raise ConfigError("resume", f"{path / checkpoint.META_FILE}: not a meta.json that "
                                        f"trainrun wrote ({what}); allowed: a checkpoint "
                                        f"written by trainrun") from None
        check_shards(cfg, path)
        check_steps(cfg, step, run_dir)
    return path, damaged


RECORDED = ("model", "data", "tokenizer", "optimizer", "trainer")  # the sections read back


def check_recorded(cfg: Config, meta: dict) -> None:
    """meta.json holds what trainrun writes there, where a resume reads it back: in each
    section of RECORDED whose schema is cfg's (another is check_compatible's to refuse),
    each key of the schema with a value of its type; the numbers a resume computes with
    (the old schedule's max_steps, at least the checkpoint's update, and lr) as validate()
    allows them; the tokenizer's fingerprint a string. Raises ValueError naming the first
    entry that is not, where a value edited by hand would otherwise end in a traceback."""
    saved = {name: _typed(getattr(cfg, name), meta["config"].get(name, {}), f"config.{name}")
             for name in RECORDED
             if saved_schemas(meta).get(name, schemas(cfg).get(name)) == schemas(cfg).get(name)}
    try:
        require_positive("trainer.max_steps", saved["trainer"].max_steps)
        if "optimizer" in saved:
            require_positive("optimizer.lr", saved["optimizer"].lr)
    except ConfigError as exc:
        allowed = exc.message.replace("; allowed: ", " (allowed: ")
        raise ValueError(f"config.{exc.key}: {allowed}{')' if allowed != exc.message else ''}") \
            from None
    if meta["step"] > saved["trainer"].max_steps:
        raise ValueError(f"config.trainer.max_steps: {saved['trainer'].max_steps}, below the "
                         f"checkpoint's update {meta['step']}")
    check_reproducibility(meta.get("reproducibility", {}))
    record = meta.get("tokenizer", {"fingerprint": "byte"})
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), str):
        raise ValueError(f"tokenizer: {record!r}, where trainrun writes its fingerprint")


def check_reproducibility(record) -> None:
    """meta.json's `reproducibility` holds what determinism.record writes (each entry is
    optional: older versions wrote fewer); raises ValueError naming the first that does not."""
    if not isinstance(record, dict):
        raise ValueError(f"reproducibility: {record!r}, where trainrun writes a record")
    kinds = {"threads": (int, MAX_THREADS), "processes": (int, None), "torch": (str, None),
             "device": (str, None), "deterministic": (bool, None)}
    for key, (kind, most) in kinds.items():
        value = record.get(key, kind())
        if kind is int:
            fits = type(value) is int and value >= 1 and (most is None or value <= most)
            allowed = f"a whole number from 1{f' to {most}' if most else ''}"
        else:
            fits, allowed = type(value) is kind, f"a {kind.__name__}"
        if key in record and not fits:
            raise ValueError(f"reproducibility.{key}: {value!r}, where trainrun writes {allowed}")


def _typed(section, recorded: dict, where: str):
    """The keys of `recorded` that `section`'s schema has, typed by it, over section's
    values (keys of other versions are not read back, so not checked)."""
    node = OmegaConf.structured(section)
    try:
        node = OmegaConf.merge(node, {k: v for k, v in recorded.items() if k in node})
    except OmegaConfBaseException as exc:
        raise ValueError(f"{where}.{getattr(exc, 'full_key', '')}: {reason(exc)}") from None
    return OmegaConf.to_object(node)


def check_shards(cfg: Config, path: Path) -> None:
    """A checkpoint holds sharded/ exactly when its run is sharded (trainer.strategy=fsdp):
    a run of another strategy never reads one, and does not resume past one planted."""
    sharded = cfg.trainer.strategy == "fsdp"
    if (path / checkpoint.SHARDS).exists() == sharded:
        return
    if sharded:
        raise ConfigError("resume", f"{path}: no {checkpoint.SHARDS}/ in this checkpoint of a "
                                    f"trainer.strategy=fsdp run; allowed: a checkpoint written "
                                    f"by trainrun")
    raise ConfigError("resume", f"{path / checkpoint.SHARDS}: sharded files in a checkpoint of "
                                f"a trainer.strategy={cfg.trainer.strategy} run, which writes "
                                f"none and never reads them; allowed: a checkpoint written by "
                                f"trainrun (without {checkpoint.SHARDS}/)")
