"""The configuration: one schema per group option, one root schema, one validate().

Config flows one way: YAML option (conf/) -> its schema (a dataclass registered here in
Hydra's ConfigStore, so unknown keys and wrong types fail at composition) -> `to_config`
(turns the composed DictConfig into dataclass instances) -> `validate` (every cross-field
rule, each naming the dotted key) -> the builders, each given its own section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from omegaconf import MISSING, DictConfig, OmegaConf

from trainrun import bleu, threads
from trainrun.clip import CLIPPERS, ClipConfig
from trainrun.data import DATA, TOKENIZERS, DataConfig, MixDataConfig, TokenizerConfig
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.distributed import STRATEGIES
from trainrun.errors import ConfigError, require_in, require_positive
from trainrun.models import MODELS, ModelConfig
from trainrun.optimizers import OPTIMIZERS, OptimizerConfig
from trainrun.precision import PRECISIONS, PrecisionConfig
from trainrun.schedules import SCHEDULES, SchedulerConfig
from trainrun.trackers import check as check_trackers


@dataclass
class TrainerConfig:
    max_steps: int = MISSING  # optimizer updates, not micro-batches
    grad_accum_steps: int = MISSING  # micro-batches per update
    eval_every: int = MISSING  # updates between validations (and one at the end)
    eval_sequences: int | None = MISSING  # the validation set: the split's first N; null: all
    eval_batches: int | None = None  # deprecated: eval_sequences = eval_batches × batch_size
    log_every: int = MISSING  # updates between train/loss, grad_norm, tokens/s records
    ckpt_every: int = MISSING  # updates between checkpoints (and one at the end)
    keep_last: int = MISSING  # newest checkpoints kept (the final one is always kept)
    seed: int = MISSING
    device: str = MISSING  # auto | cpu | cuda
    compile: bool = MISSING  # torch.compile the model
    max_skipped: int = MISSING  # consecutive non-finite updates before the run stops
    deterministic: bool = MISSING  # deterministic kernels: bit-exact GPU runs (determinism.py)
    strategy: str = MISSING  # ddp | fsdp: how processes share the model (distributed.py)
    ckpt_every_minutes: float | None = MISSING  # also a checkpoint after this long; null: off
    keep_best: bool = MISSING  # keep the best val/loss checkpoint as checkpoints/best/
    early_stop_patience: int | None = MISSING  # validations without improvement; null: off
    threads: str = MISSING  # auto | N: CPU threads of torch's operators (threads.py)
    label_smoothing: float = 0.0  # of the training loss; validation reports the plain NLL
    bleu_every: int | None = None  # translation: BLEU of the first bleu_sentences validation
    bleu_sentences: int = 200  # pairs every bleu_every updates (greedy decoding); null: off
    ema_decay: float | None = None  # the weights' moving average (ema.py), 0 < d < 1; null: off
    ema_warmup: bool = False  # decay min(ema_decay, (1 + k) / (10 + k)) at update k

    # deprecated keys and the key each is a form of: naming one on the command line sets the
    # other to null, and on resume replaces the saved other (trainrun.composition.overrides)
    deprecated: ClassVar[dict[str, str]] = {"eval_batches": "eval_sequences"}


@dataclass
class Config:
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    tokenizer: TokenizerConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    scheduler: SchedulerConfig = MISSING
    clip: ClipConfig = MISSING
    precision: PrecisionConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    resume: str | None = None  # null | auto | a run directory
    # where the scalars go: tensorboard (always: the run's record), mlflow, wandb, trackio
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])


GROUPS = {  # option -> its schema (a model option's schema is its family's: MODELS)
    "data": DATA,
    "tokenizer": TOKENIZERS,
    "optimizer": OPTIMIZERS,
    "scheduler": SCHEDULES,
    "clip": CLIPPERS,
    "precision": PRECISIONS,
}
DEVICES = ("auto", "cpu", "cuda")


def register_schemas() -> None:
    """Put every schema in Hydra's ConfigStore, in groups of their own (`schemas/<group>`)
    so that they are never among the options a user picks from: each
    conf/<group>/<option>.yaml extends `/schemas/<group>/<option>` (a model option its
    family's, `/schemas/model/<family>`), and conf/config.yaml extends `schemas/root`."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="schemas", name="root", node=Config)
    for family, schema in MODELS.items():
        store.store(group="schemas/model", name=family, node=schema)
    # the one schema of model options written before there were families (GPT-2's)
    store.store(group="schemas/model", name="model", node=MODELS["gpt"])
    for group, registry in GROUPS.items():
        for option, schema in registry.items():
            store.store(group=f"schemas/{group}", name=option, node=schema)


def to_config(cfg: DictConfig) -> Config:
    """The composed DictConfig as dataclass instances, rejecting keys added with `+`."""
    _reject_unknown_keys(cfg, "")
    try:
        return OmegaConf.to_object(cfg)
    except Exception as exc:  # MissingMandatoryValue, interpolation errors
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(key, str(exc).splitlines()[0]) from None


def _reject_unknown_keys(node: Any, prefix: str) -> None:
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    allowed = (
        {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    )
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if allowed is not None and key not in allowed:
            raise ConfigError(
                dotted, f"unknown key; allowed keys here: {', '.join(sorted(allowed))}"
            )
        if not OmegaConf.is_missing(node, key):
            _reject_unknown_keys(node._get_node(key), f"{dotted}.")


def option_name(section: Any, registry: dict[str, type]) -> str:
    """The group option (`cosine`, `adamw`, ...) whose schema `section` is an instance of."""
    for name, schema in registry.items():
        if type(section) is schema:
            return name
    raise TypeError(f"{type(section).__name__} is not registered")


FLOAT32_MAX = 3.4028234663852886e38  # numbers end up in float32 tensors on the device
INT64 = 2**63  # and counts in int64 ones


def check_numbers(node: Any, prefix: str) -> None:
    """The rule every number of every section follows, whatever its own checks: no NaN, no
    finite value beyond float32's range, no whole number beyond int64's."""
    for f in dataclasses.fields(node):
        check_number(getattr(node, f.name), f"{prefix}{f.name}")


def check_number(value: Any, key: str) -> None:
    if dataclasses.is_dataclass(value):
        check_numbers(value, f"{key}.")
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_number(item, key)
    elif isinstance(value, bool):
        return
    elif isinstance(value, int) and not -INT64 <= value < INT64:
        raise ConfigError(key, f"got {value}, past int64; allowed: a whole number below 2**63")
    elif isinstance(value, float) and value != value:
        raise ConfigError(key, "got nan; allowed: a number")
    elif isinstance(value, float) and FLOAT32_MAX < abs(value) < float("inf"):
        raise ConfigError(key, f"got {value:g}, past float32's largest value "
                               f"{FLOAT32_MAX:.4g}; allowed: a number within it")


def validate(cfg: Config, data: bool = True) -> Config:
    """Check every cross-field rule; raise ConfigError naming the first key that is wrong.

    data=False leaves the data source unchecked, for the commands that read no data
    (trainrun-sample, trainrun-export): a finished run's files may have moved since."""
    t = cfg.trainer
    check_numbers(cfg if data else dataclasses.replace(cfg, data=None), "")
    for key in ("max_steps", "grad_accum_steps", "eval_every", "log_every", "ckpt_every",
                "keep_last", "max_skipped"):
        require_positive(f"trainer.{key}", getattr(t, key))
    for key in ("eval_sequences", "eval_batches", "ckpt_every_minutes", "early_stop_patience"):
        if getattr(t, key) is not None:
            require_positive(f"trainer.{key}", getattr(t, key))
    if t.eval_batches is not None and data and isinstance(cfg.data, MixDataConfig):
        raise ConfigError("trainer.eval_batches", "deprecated, and not for data=mix; allowed: "
                                                  "trainer.eval_sequences=N (of each source)")
    if t.eval_batches is not None and t.eval_sequences is not None:
        raise ConfigError("trainer.eval_batches", f"{t.eval_batches} with trainer.eval_sequences="
                                                  f"{t.eval_sequences}; eval_batches is the "
                                                  f"deprecated form of eval_sequences; allowed: "
                                                  f"one of them, trainer.eval_sequences=N "
                                                  f"(validation sequences, whatever the batch "
                                                  f"size)")
    if not 0 <= t.label_smoothing < 1:
        raise ConfigError("trainer.label_smoothing", f"got {t.label_smoothing}; allowed: "
                                                     f"0 <= label_smoothing < 1 (0.1 in "
                                                     f"Vaswani et al.)")
    if t.bleu_every is not None:
        require_positive("trainer.bleu_every", t.bleu_every)
        if cfg.model.task != "translation":
            raise ConfigError("trainer.bleu_every", f"{t.bleu_every} with model family "
                                                    f"{cfg.model.family}, which does not "
                                                    f"translate; allowed: null")
        bleu.require("trainer.bleu_every")
    require_positive("trainer.bleu_sentences", t.bleu_sentences)
    check_ema(cfg)
    threads.check("trainer.threads", t.threads)
    require_in("trainer.device", t.device, DEVICES)
    require_in("trainer.strategy", t.strategy, STRATEGIES)
    if not 0 <= t.seed < 2**32:
        raise ConfigError("trainer.seed", f"got {t.seed}; allowed: 0 <= seed < 2**32")
    cfg.model.validate("model")
    if data:
        cfg.data.validate("data")
        cfg.tokenizer.validate("tokenizer")  # the commands after training read the run's copy
        if getattr(cfg.data, "streaming", False) and type(cfg.tokenizer) is TOKENIZERS["bpe"]:
            raise ConfigError("tokenizer", "bpe with data.streaming=true, which would have to read "
                                           "the whole stream to train it first; allowed: "
                                           "tokenizer=byte, or tokenizer=hf tokenizer.path=<a "
                                           "tokenizer.json>, e.g. the one a tokenizer=bpe run on "
                                           "a sample of the corpus keeps in its directory")
    if cfg.data.document_mask and not cfg.model.masks_documents:
        raise ConfigError("data.document_mask", f"true with model family {cfg.model.family}, "
                                                f"which cannot mask documents; allowed: false, "
                                                f"or a model of family " + " or ".join(
                                                    f for f, m in MODELS.items()
                                                    if m.masks_documents))
    if data and cfg.data.task != cfg.model.task:
        raise ConfigError("model", f"a {cfg.model.family} model ({cfg.model.task}) with data of "
                                   f"{cfg.data.task}; allowed: "
                                   + ("model=transformer_tiny|transformer_small|transformer_base "
                                      "(an encoder-decoder)" if cfg.data.task == "translation"
                                      else "a decoder (gpt_*, llama_*), or data=parallel for an "
                                           "encoder-decoder"))
    if cfg.data.task == "translation":
        for key, value in zip(("max_source_len", "max_target_len"), cfg.data.limits(),
                              strict=True):
            if value > cfg.model.max_seq_len:
                raise ConfigError(f"data.{key}", f"{value} exceeds model.max_seq_len="
                                                 f"{cfg.model.max_seq_len}; allowed: at most "
                                                 f"{cfg.model.max_seq_len}, or raise "
                                                 f"model.max_seq_len")
    elif cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            "data.seq_len",
            f"{cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; "
            f"lower data.seq_len or raise model.max_seq_len",
        )
    if cfg.model.init_from is not None and cfg.resume is None:  # a resumed run has its weights
        if type(cfg.tokenizer) is TOKENIZERS["byte"]:  # others: once built (builders.build_model)
            cfg.model.check_init_from(ByteTokenizer.vocab_size)
    cfg.optimizer.validate("optimizer")
    cfg.scheduler.validate("scheduler", t.max_steps, cfg.optimizer.lr)
    check_optimizer_fits(cfg)
    cfg.clip.validate("clip")
    cfg.precision.validate("precision")
    check_trackers("trackers", cfg.trackers)
    if cfg.resume is not None and cfg.resume != "auto" and not cfg.resume.strip():
        raise ConfigError("resume", "allowed: null, auto, or a run directory")
    return cfg


def check_ema(cfg: Config) -> None:
    """trainer.ema_decay is a decay, and not of schedule-free AdamW, whose evaluated
    weights are already an average of its iterates."""
    t = cfg.trainer
    if t.ema_decay is None:
        if t.ema_warmup:
            raise ConfigError("trainer.ema_warmup", "true with trainer.ema_decay=null (no "
                                                    "average); allowed: false, or set "
                                                    "trainer.ema_decay (e.g. 0.999)")
        return
    if not 0 < t.ema_decay < 1:
        raise ConfigError("trainer.ema_decay", f"got {t.ema_decay}; allowed: 0 < ema_decay < 1 "
                                               f"(e.g. 0.999), or null for no average")
    if option_name(cfg.optimizer, OPTIMIZERS) == "schedulefree":
        raise ConfigError("trainer.ema_decay", f"{t.ema_decay} with optimizer=schedulefree, "
                                               f"whose weights are already an average; "
                                               f"allowed: null")


def check_optimizer_fits(cfg: Config) -> None:
    """The scheduler and the strategy go with the optimizer: schedule-free AdamW takes no
    decay schedule; Muon and Adafactor need whole parameters, not FSDP's shards."""
    name = option_name(cfg.optimizer, OPTIMIZERS)
    allowed = cfg.optimizer.schedulers
    scheduler = option_name(cfg.scheduler, SCHEDULES)
    if allowed is not None and scheduler not in allowed:
        raise ConfigError("scheduler", f"{scheduler} with optimizer={name}, which needs no decay "
                                       f"schedule; allowed: {', '.join(allowed)} (add "
                                       f"scheduler={allowed[0]})")
    if cfg.trainer.strategy == "fsdp" and not cfg.optimizer.shards:
        raise ConfigError("trainer.strategy", f"fsdp with optimizer={name}, which needs whole "
                                              f"parameters, not FSDP's shards; allowed: ddp")
