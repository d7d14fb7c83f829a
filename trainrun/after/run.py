"""A run directory as data, for the commands after training.

The config is the run's own: the overrides it saved in .hydra/overrides.yaml, taken only as
`trainrun resume=<dir>` takes them (trainrun's own keys with plain values, nothing that
reaches Hydra or OmegaConf's resolvers), then the command's own overrides, composed and
validated as `trainrun` does it; model.init_from is left out (the checkpoint holds the
weights). The checkpoint is the newest intact step-* one (a damaged newer one is skipped
with a warning, and left where it is) or the one asked for (a step, best/, an average); its
meta.json must describe the model that the config builds (which masks documents as the
run was trained, unless the command sets data.document_mask) and name the tokenizer it was
trained with: the run's copy (tokenizer.json) must be there exactly when meta.json names
one, with the fingerprint it records, so that no figure, sample or export is made with
other ids. torch's CPU threads are set as `trainrun` sets them (trainrun.threads): the run's
trainer.threads unless the command is given another (--threads, an override).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from trainrun import builders, checkpoint, resume, rundir, runner, threads
from trainrun.after.output import Parser
from trainrun.config import Config
from trainrun.data import RUN_FILE, Tokenizer
from trainrun.data.tokenizers import ByteTokenizer, JSONTokenizer
from trainrun.errors import ConfigError, NotTrainrun
from trainrun.models import family_of
from trainrun.precision import Precision
from trainrun.threads import set_threads

ARG = "RUN_DIR"
# what a command that needs a model of one task (open_run's `task`) says of another's run
TASKS = {"lm": "which translates rather than continues a text; allowed: a decoder's run "
               "(trainrun-translate RUN_DIR FILE translates with this one)",
         "translation": "which does not translate; allowed: a run of model=transformer_* on "
                        "data=parallel (trainrun-sample writes text with a decoder)"}
WEIGHTS = ("raw", "ema")  # --weights: the checkpoint's model.safetensors, or model_ema.safetensors
RUN_ALLOWED = "a run directory of trainrun (outputs/<date>/<time>) with a checkpoint"


@dataclass
class Run:
    run_dir: Path
    cfg: Config
    checkpoint: Path  # checkpoints/step-XXXXXXXX, or best/, average-.../ (--checkpoint)
    step: int  # the update the checkpoint was written after
    model: torch.nn.Module  # the checkpoint's weights (the family's module), on device, in eval mode
    tokenizer: Tokenizer
    device: torch.device
    precision: Precision
    warnings: list[str]
    threads: str  # the line that says how many CPU threads torch's operators use


def arguments(p: Parser) -> None:
    """RUN_DIR (the first positional argument), --checkpoint and --config-dir."""
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (outputs/<date>/<time>)")
    p.add_argument("--checkpoint", metavar="step-N",
                   help="this checkpoint instead of the newest: step-N, N, or the name of "
                        "another folder of checkpoints/ (best, average-...)")
    p.add_argument("--config-dir", metavar="DIR",
                   help="the folder the run was started with `trainrun --config-dir DIR`")
    p.add_argument("--weights", choices=WEIGHTS, default="raw",
                   help="raw: the weights as trained (default); ema: their moving average, "
                        "which a run with trainer.ema_decay saves in every checkpoint")


def threads_argument(p: Parser) -> None:
    """--threads, for the commands that compute with the model (sample, eval)."""
    p.add_argument("--threads", metavar="N",
                   help="CPU threads of torch's operators: auto (the free cores, as trainrun "
                        "chooses them) or a number; as trainer.threads=N (default: the run's "
                        "trainer.threads, auto unless it set one)")


def thread_overrides(value: str | None) -> list[str]:
    """--threads as the override it stands for."""
    if value is None:
        return []
    threads.check("--threads", value)
    return [f"trainer.threads={value.strip()}"]


def config(run_dir: Path, overrides: list[str], data: bool,
           config_dir: str | None = None) -> Config:
    """The run's saved overrides, then `overrides` (a group switched drops the old option's
    keys), composed and validated (data=False: the data source unchecked), with the options
    of config_dir too (--config-dir)."""
    from trainrun.composition import checked_config_dir, validated_configs
    from trainrun.composition.overrides import OWN, continue_run, key, one_of

    folder = None if config_dir is None else checked_config_dir(config_dir)
    try:
        merged = continue_run(run_dir, overrides, folder)
    except ConfigError as error:  # refused by the trust boundary, named as resume's are
        raise ConfigError(ARG, error.message) from None
    (cfg,) = validated_configs([one_of([o for o in merged if key(o) not in (*OWN, "model.init_from")])],
                     data, folder)
    return cfg


def others(root: Path) -> list[Path]:
    """The checkpoint folders of root beside the step-* ones, by name: best/ and the averages
    of trainrun-average (none hidden: those are a save's leftovers)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                  and checkpoint.step_number(p) is None and not p.name.startswith("."))


def find_checkpoint(run_dir: Path, name: str | None) -> tuple[Path, list[str]]:
    """The checkpoint `name` (step-N, N, or the name of another checkpoint folder: best,
    average-...) or else the newest intact step-* one, and warnings."""
    root = run_dir / "checkpoints"
    if name is not None:
        wanted = checkpoint.step_number(Path(name if name.startswith("step-") else f"step-{name}"))
        found = [p for p in checkpoint.complete(root) if checkpoint.step_number(p) == wanted]
        found += [p for p in others(root) if p.name == name]
        names = ", ".join(p.name for p in [*checkpoint.complete(root), *others(root)]) or "none"
        if not found:
            raise ConfigError("--checkpoint", f"{name!r} is not a checkpoint in {root}; allowed: "
                                              f"{names}")
        problem = checkpoint.verify(found[0])
        if problem is not None:
            raise ConfigError("--checkpoint", f"{found[0]} is damaged ({problem}); allowed: an "
                                              f"intact one of {names}")
        return found[0], []
    path, damaged = resume.find(run_dir)
    if path is None and damaged:
        bad, problem = next(iter(damaged.items()))
        raise ConfigError(ARG, f"{run_dir}: no intact checkpoint; {bad.name} is damaged "
                               f"({problem}); allowed: {RUN_ALLOWED}")
    if path is None:
        raise ConfigError(ARG, f"{run_dir}: no checkpoint in {root}; allowed: {RUN_ALLOWED}")
    return path, [f"checkpoint {p} is damaged ({problem}); using {path.name}"
                  for p, problem in damaged.items()]


def not_meta(path: Path, why: object) -> ConfigError:
    return ConfigError(ARG, f"{path / checkpoint.META_FILE}: not a meta.json that trainrun "
                            f"wrote ({why}); allowed: {RUN_ALLOWED}")


def check_shape(cfg: Config, path: Path) -> tuple[int, dict]:
    """The update of checkpoint `path`, whose meta.json must give the model cfg builds, and
    that meta.json."""
    try:
        meta = checkpoint.read_meta(path)
        step, saved = int(meta["step"]), meta["config"]["model"]
        family = family_of(resume.saved_schemas(meta)["model"])
        differs = [k for k in cfg.model.shape_keys if saved.get(k) != getattr(cfg.model, k)]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise not_meta(path, exc) from None
    if family != cfg.model.family:
        raise ConfigError(ARG, f"{path.name} holds a model of family {family}, but the run's "
                               f"saved overrides (.hydra/overrides.yaml) choose family "
                               f"{cfg.model.family}; allowed: {RUN_ALLOWED} and its .hydra/")
    if differs:
        k = differs[0]
        raise ConfigError(ARG, f"{path.name} holds a model with model.{k}={saved[k]}, but the "
                               f"run's saved overrides (.hydra/overrides.yaml) give "
                               f"{getattr(cfg.model, k)}; allowed: {RUN_ALLOWED} and its .hydra/")
    return step, meta


def document_mask(meta: dict, overrides: list[str], composed: bool) -> bool:
    """Whether the model masks documents: as the run was trained (its checkpoint's
    meta.json), whatever data the command reads (data=text ... drops the run's data keys),
    unless the command itself sets data.document_mask (the `composed` value then)."""
    from trainrun.composition.overrides import key

    if any(key(o) == "data.document_mask" for o in overrides):
        return composed
    saved = meta.get("config", {}).get("data")
    return isinstance(saved, dict) and saved.get("document_mask") is True


def tokenizer_of(run_dir: Path, path: Path, meta: dict, eot: str | None) -> Tokenizer:
    """The tokenizer checkpoint `path` was trained with, as its meta.json records it: the
    byte tokenizer, or the run's copy (run_dir/tokenizer.json, end of document `eot`) with
    the recorded fingerprint. A meta.json without a record is from before tokenizers had
    options (they came with the record), so bytes, as its schemas must then say too."""
    record = meta.get("tokenizer")
    if record is None:
        schema = meta.get("schemas", {}).get("tokenizer", "ByteConfig")
        if schema != "ByteConfig":
            raise not_meta(path, f"no tokenizer record for a run with {schema}")
        record = {"fingerprint": "byte", "file": None}
    if not (isinstance(record, dict) and isinstance(record.get("fingerprint"), str)
            and record.get("file") in (None, RUN_FILE)
            and (record["file"] is None) == (record["fingerprint"] == "byte")):
        raise not_meta(path, f"tokenizer: {record!r}")
    copy = run_dir / RUN_FILE
    if record["file"] is None:
        if os.path.lexists(copy):
            raise ConfigError(ARG, f"{copy}: {path.name} was trained with the byte tokenizer, "
                                   f"which has no tokenizer.json; allowed: {RUN_ALLOWED}, "
                                   f"without a tokenizer.json that is not its own")
        return ByteTokenizer()
    saved = record["fingerprint"]
    if not copy.is_file():
        what = "is not a regular file" if os.path.lexists(copy) else "is missing"
        raise ConfigError(ARG, f"{copy} {what}; {path.name} was trained with it "
                               f"(fingerprint {saved[:12]} in meta.json); allowed: "
                               f"{RUN_ALLOWED} and its own tokenizer.json")
    try:
        tokenizer = JSONTokenizer.from_file(copy, eot)
    except ConfigError as error:  # not a tokenizer.json, or without the run's end of document
        raise ConfigError(ARG, f"{error.message}; {path.name} was trained with another one "
                               f"(fingerprint {saved[:12]} in meta.json)") from None
    if tokenizer.fingerprint() != saved:
        raise ConfigError(ARG, f"{copy} is not the tokenizer {path.name} was trained with "
                               f"(fingerprint {tokenizer.fingerprint()[:12]}, meta.json "
                               f"records {saved[:12]}); allowed: {RUN_ALLOWED} and its own "
                               f"tokenizer.json")
    return tokenizer


def open_run(run_dir: str, overrides: list[str], checkpoint_name: str | None = None,
             data: bool = True, config_dir: str | None = None, weights: str = "raw",
             task: str | None = None) -> Run:
    """Everything a command after training needs; every problem is one ConfigError, raised
    before the model is built. `weights`: raw, or ema for the weights' moving average;
    `task`: the model task the command needs (None: any)."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise ConfigError(ARG, f"{run_dir}: no such directory; allowed: {RUN_ALLOWED}")
    if not (path / "checkpoints").is_dir():
        raise ConfigError(ARG, f"{run_dir}: no checkpoints/ in it; allowed: {RUN_ALLOWED}")
    rundir.check(path, ARG)  # before anything in it is read
    cfg = config(path.resolve(), overrides, data, config_dir)
    ckpt, warnings = find_checkpoint(path, checkpoint_name)
    step, meta = check_shape(cfg, ckpt)
    if task is not None and cfg.model.task != task:
        raise ConfigError(ARG, f"{run_dir} trained a {cfg.model.family} model, {TASKS[task]}")
    if weights == "ema" and not checkpoint.has_ema(ckpt):
        why = ("an average of checkpoints (trainrun-average) keeps their raw weights only"
               if meta.get(checkpoint.WEIGHTS_ONLY) else
               "the run was trained with trainer.ema_decay=null")
        raise ConfigError("--weights", f"ema: {ckpt} holds no average of the weights ({why}); "
                                       f"allowed: raw, or a checkpoint of a run with "
                                       f"trainer.ema_decay")
    tokenizer = tokenizer_of(path, ckpt, meta, getattr(cfg.tokenizer, "eot", None))
    device, precision = runner.device_and_precision(cfg)
    threads_line, _ = set_threads(cfg.trainer.threads)  # as a fresh trainrun run does
    masked = document_mask(meta, overrides, cfg.data.document_mask)
    model = builders.build_model(cfg.model, tokenizer.vocab_size, device,
                                 document_eot=tokenizer.eot if masked else None)
    try:
        checkpoint.load_weights(ckpt, model, checkpoint.EMA_FILE if weights == "ema"
                                else checkpoint.MODEL_FILE)
    except NotTrainrun as error:
        raise ConfigError(ARG, f"{error}; allowed: {RUN_ALLOWED}") from None
    return Run(path, cfg, ckpt, step, model.eval(), tokenizer, device, precision, warnings,
               threads_line)
