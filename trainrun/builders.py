"""Build a run's components from its validated config, each builder given its own section
(the model its ModelConfig, the optimizer its OptimizerConfig, ...): the data, the model,
the replicas, optimizer, schedule and clipper, gathered as state.Components for the loop."""

from __future__ import annotations

import random

import numpy as np
import torch

from trainrun import data, determinism, devices, distributed, signals, validation
from trainrun.config import Config
from trainrun.console import Console
from trainrun.data.order import DataOrder, sequences_per_update
from trainrun.ema import Ema
from trainrun.models import ModelConfig
from trainrun.optimizers import build_optimizer
from trainrun.precision import Precision
from trainrun.schedules import build_schedule
from trainrun.state import Components, Counters
from trainrun.threads import set_threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def build_model(cfg: ModelConfig, vocab_size: int, device: torch.device,
                console: Console | None = None, document_eot: int | None = None
                ) -> torch.nn.Module:
    """The model of cfg's family on device over vocab_size ids (the tokenizer's), its
    initialization drawn from the seeded generator; given a console (a run that starts from
    its config, not from a checkpoint), model.init_from's weights then replace it.
    `document_eot`: the end-of-document id under data.document_mask (validate() has checked
    that the family masks documents), None otherwise."""
    model = cfg.build(vocab_size)
    if document_eot is not None:
        model.mask_documents(document_eot)
    if console is not None and cfg.init_from is not None:
        for note in cfg.hf.load(cfg, model):
            console.warning(note)
        console.info(f"weights from model.init_from={cfg.init_from}, a model of "
                     f"{cfg.describe()}")
    return model.to(device)


def build_components(cfg: Config, device: torch.device, precision: Precision, console: Console,
          world: distributed.World = distributed.ONE_PROCESS, pretrained: bool = True,
          threads: int | None = None) -> Components:
    """The run's components; `pretrained`: the weights of model.init_from, if set (False
    when a checkpoint will replace them); `threads`: the CPU threads of the checkpoint a
    resume continues, taken under trainer.threads=auto (threads.py)."""
    t = cfg.trainer
    deterministic = determinism.enable(t.deterministic)  # before the first CUDA kernel
    if deterministic:
        console.info(deterministic)
    line, warn = set_threads(t.threads, threads)
    (console.warning if warn else console.info)(line)
    if t.device == "auto" and devices.hidden_gpus():
        console.warning("CUDA_VISIBLE_DEVICES is empty: no GPU is visible to this process, "
                        "so it trains on the CPU")
    seed_everything(t.seed)
    signals.check()  # stops that came during a library's call, between start-up phases
    splits = load_data(cfg, world, console)
    signals.check()
    model = build_model(cfg.model, splits.tokenizer.vocab_size, device,
                        console if pretrained else None,
                        splits.tokenizer.eot if cfg.data.document_mask else None)
    replicas = distributed.Replicas(model, t.strategy, world, device, t.compile)
    signals.check()
    optimizer = build_optimizer(cfg.optimizer, model, device)
    schedule = build_schedule(cfg.scheduler, cfg.optimizer.lr, t.max_steps, cfg.model.d_model)
    schedule.check(optimizer)
    batch_size = 1 if translation(cfg) else cfg.data.batch_size  # a bucket per micro-batch
    if world.size > 1 or t.strategy == "fsdp":
        console.info(f"{world.size} process(es), strategy {t.strategy}, rank 0 writes the run")
    what, update = describe_data(cfg, splits, world.size)
    console.info(f"device {device}, precision {precision.mode}; model {model.num_params():,} "
                 f"parameters; {what}")
    console.info(update)
    for note in schedule.notes():  # noam: optimizer.lr unused, warmup longer than the run
        console.warning(note)
    val, val_size = validation.validation_set(t, cfg.data.batch_size, splits["validation"])
    return Components(
        cfg=t, replicas=replicas, raw_model=model, optimizer=optimizer, schedule=schedule,
        clipper=cfg.clip.build(model), precision=precision, train=splits["train"],
        val=val, order=order_of(splits.train, t.seed),
        batch_size=batch_size, device=device, counters=Counters(), world=world,
        tokenizer=splits.tokenizer,
        val_size=val_size,
        val_batch_size=eval_batch_size(cfg), unit="pairs" if translation(cfg) else "sequences",
        # of the weights training starts from, sharded as they are; a resume loads its own
        ema=None if t.ema_decay is None else Ema(model, t.ema_decay, t.ema_warmup),
    )


def order_of(train, seed: int):
    """The position in the training data's stream: the seeded order over its sequences
    (order.DataOrder), or the one a kind of data makes for itself (`train.make_order(seed)`:
    a mixture's, a stream's), with the same next_window, state_dict and load_state_dict."""
    make = getattr(train, "make_order", None)
    return make(seed) if make is not None else DataOrder(len(train), seed)


def translation(cfg: Config) -> bool:
    return cfg.data.task == "translation"


def eval_batch_size(cfg: Config) -> int:
    """Sequences (pairs) per validation forward pass: data.batch_size, or with
    data.max_tokens as many of the longest pairs as it holds."""
    if translation(cfg) and cfg.data.max_tokens is not None:
        return max(1, cfg.data.max_tokens // max(cfg.data.limits()))
    return cfg.data.batch_size


def describe_data(cfg: Config, splits: data.Loaded, processes: int) -> tuple[str, str]:
    """The data, and what one update trains on, for the run's log."""
    t = cfg.trainer
    if translation(cfg):
        budget = (f"up to {cfg.data.max_tokens:,} tokens" if cfg.data.max_tokens
                  else f"{cfg.data.batch_size} pairs")
        return (f"data {len(splits['train'].pairs):,} train pairs in {len(splits['train']):,} "
                f"batches, {len(splits['validation']):,} validation pairs",
                f"update = {t.grad_accum_steps} micro-batch(es) of {budget} x {processes} "
                f"process(es), the loss normalized by all their target tokens; "
                f"{t.max_steps} updates")
    sequences = sequences_per_update(cfg.data.batch_size, t.grad_accum_steps, processes)
    train = (f"{len(splits['train']):,} train" if not isinstance(splits.train, data.Stream)
             else "streamed train")  # a stream's length is unknown: max_steps ends the run
    return (f"data {train} / {len(splits['validation']):,} validation "
            f"sequences of {cfg.data.seq_len} tokens",
            f"update = {t.grad_accum_steps} micro-batch(es) x {cfg.data.batch_size} sequences x "
            f"{processes} process(es) = {sequences} sequences, up to "
            f"{sequences * cfg.data.seq_len:,} tokens; {t.max_steps} updates")


def load_data(cfg: Config, world: distributed.World, console: Console) -> data.Loaded:
    """The data, tokenized by rank 0 first: the other ranks then map the token files it
    wrote (the cache's lock would make them wait anyway; the barrier keeps their `datasets`
    reads off the disk while rank 0 tokenizes)."""
    if not world.main:
        distributed.barrier()
    if translation(cfg):
        splits = data.load_pairs(cfg.data, cfg.tokenizer, console.info, seed=cfg.trainer.seed,
                                 bar=console.bytes_bar)
    else:
        splits = data.load(cfg.data, cfg.tokenizer, console.info, bar=console.bytes_bar)
        data.check_batch(cfg.data, splits.train)
    if world.main:
        distributed.barrier()
    return splits

