"""`trainrun --help`: what trainrun is, each config group with its real options (the schemas
stored beside them in Hydra's ConfigStore are not options), and a few commands to copy.
Hydra's own flags keep working and `--hydra-help` still prints Hydra's help."""

from __future__ import annotations

import dataclasses

from trainrun.composition.overrides import default_options, groups, options
from trainrun.config import TrainerConfig
from trainrun.models import formats

PURPOSE = {
    "model": "the decoder: its family and size (docs/models.md)",
    "data": "what it trains on: the built-in corpus, local files, a datasets source",
    "tokenizer": "how text becomes ids: bytes, a BPE trained on the data, a tokenizer.json",
    "optimizer": "the optimizer; optimizer.lr is the peak learning rate",
    "scheduler": "the learning-rate schedule over trainer.max_steps updates, with warmup",
    "clip": "gradient clipping, once per update",
    "precision": "fp32, or bf16/fp16 autocast (fp16 with dynamic loss scaling)",
    "hparams_search": "a sweeper's search over lr, warmup, max_norm and schedule (the sweep extra)",
}

EXAMPLES = [
    ("trainrun", "tiny GPT on the built-in corpus; a CPU is enough"),
    ("trainrun scheduler=noam clip.max_norm=1.0", "any option and any key"),
    ("trainrun -m scheduler=cosine,wsd optimizer.lr=1e-3,3e-4", "a sweep of 4 runs"),
    ("trainrun -m hydra/launcher=parallel optimizer.lr=1e-3,3e-4", "2 runs at a time"),
    ("trainrun -m hparams_search=optuna hydra.sweeper.n_trials=20", "Optuna's search"),
    ("trainrun resume=outputs/2026-11-21/14-03-12", "continue a run from its checkpoint"),
    ("trainrun --cfg job optimizer=lamb", "print the composed config, run nothing"),
    ("trainrun-lr scheduler=wsd", "preview a schedule without training"),
    ("trainrun-sample RUN_DIR 'def '", "text from a run's checkpoint (also -eval, -export)"),
    ("trainrun model.init_from=hf-folder", "start from a Hugging Face folder (below)"),
    ("trainrun-nohup trainer.max_steps=20000", "in the background over SSH (or trainrun-tmux)"),
    ("torchrun --nproc_per_node=2 -m trainrun", "one run on 2 processes (DDP; trainer.strategy=fsdp)"),
]

HYDRA_FLAGS = [
    ("-m, --multirun", "run a sweep (comma-separated values, or a sweeper's search)"),
    ("-c, --cfg job|hydra|all", "print the config instead of running"),
    ("--info", "what Hydra composed and from where"),
    ("--hydra-help", "Hydra's own help and flags"),
    ("--version", "the versions of trainrun, torch, Hydra and the rest"),
]


def usage() -> str:
    defaults = default_options()
    width = max(len(g) for g in groups()) + 2
    lines = ["usage: trainrun [KEY=VALUE | GROUP=OPTION ...] [-m] [--cfg job] [--hydra-help]",
             "",
             "trainrun trains a Transformer with exact learning-rate schedules, clipping,",
             "mixed precision and gradient accumulation. Every key can be overridden as",
             "key=value, and each group's option as group=option.",
             "",
             "Config groups (* = default):"]
    for group in groups():
        shown = [f"{o}*" if o == defaults.get(group) else o for o in options(group)]
        lines.append(f"  {group:<{width}}{PURPOSE.get(group, '')}")
        lines.append(f"  {'':<{width}}{', '.join(shown)}")
    trainer = ", ".join(f.name for f in dataclasses.fields(TrainerConfig))
    lines += ["", "Plain keys:", f"  trainer.{{{trainer}}}",
              "  data.batch_size, data.seq_len, resume=null|auto|<run directory>",
              f"  model.init_from=null|<Hugging Face folder: {formats()}>", "",
              "Examples:"]
    # a space before every `#`, so that a line pasted into a shell drops its comment
    wide = max(len(command) for command, _ in EXAMPLES)
    lines += [f"  {command:<{wide}}  # {why}" for command, why in EXAMPLES]
    lines += ["", "Flags:"]
    lines += [f"  {flag:<26}{why}" for flag, why in HYDRA_FLAGS]
    lines += ["", "A group's keys: trainrun --cfg job GROUP=OPTION. docs/configuration.md and the",
              "pages it links describe them all."]
    return "\n".join(lines)
