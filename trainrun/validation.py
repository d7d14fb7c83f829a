"""The validation set (trainer.eval_sequences): the first n sequences of the validation split,
the same set whatever the batch size, accumulation, number of processes or resume.

n is trainer.eval_sequences (null: the whole split), at most the split's length; the
deprecated trainer.eval_batches means eval_batches × data.batch_size. The set is read in
micro-batches of data.batch_size (what fits the device), cut into one contiguous share per
rank, every rank running as many forward passes as the others (DDP's buffers and FSDP's
gathers are collectives). Each sequence's summed loss is put at its own position of a vector
of n float64s; the vector is summed over the ranks (each position comes from one rank, so the
sum adds zeros: exact) and then added up in position order, and

    val/loss = (sum of the targets' losses) / (number of targets of the n sequences)

So the batch size and the number of processes reach the figure only through each sequence's
own forward pass, whose fp32 kernels may round its last bits differently for another batch
shape.

A checkpoint records the set (`record`); a resume that measures another set says so in one
line and starts best_val_loss and early stopping over, their old losses being of other data
(`resumed`); with scheduler=plateau, whose rate depends on that history, it is refused.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from trainrun.config import TrainerConfig
from trainrun.data import IGNORE, Mixture, Pairs, Sequences
from trainrun.data.order import micro_batches
from trainrun.errors import ConfigError
from trainrun.precision import Precision
from trainrun.state import Components


def size(cfg: TrainerConfig, batch_size: int, available: int) -> int:
    """The number of validation sequences a fresh run reads, of the `available` ones."""
    asked = cfg.eval_sequences if cfg.eval_batches is None else cfg.eval_batches * batch_size
    return available if asked is None else min(asked, available)


def validation_set(cfg: TrainerConfig, batch_size: int, val):
    """(the validation split, the size of the set a fresh run reads of it): size(); of a
    mixture, the first size() sequences of each source's split, as one Mixture."""
    if isinstance(val, Mixture):
        val = val.heads({name: size(cfg, batch_size, end - first)
                         for name, (first, end) in val.spans().items()})
    return val, size(cfg, batch_size, len(val)) if not isinstance(val, Mixture) else len(val)


def batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """This rank's micro-batches of sequences 0 .. n-1 (order.micro_batches: contiguous
    shares, rank 0 first; the same number of micro-batches on every rank)."""
    return micro_batches(np.arange(n), batch_size, rank, world_size)


@torch.no_grad()
def sequence_losses(forward, seqs, batches: list[np.ndarray], n: int, device: torch.device,
                    precision: Precision) -> torch.Tensor:
    """(n,) float64 on the device: the summed loss (nats) of each sequence these micro-batches
    hold, at its index; 0 at the others. `seqs`: a Sequences or anything with its batch()."""
    losses = torch.zeros(n, dtype=torch.float64, device=device)
    for idx in batches:
        *inputs, y = seqs.batch(idx)  # (x, y), or translation's (src, src_lengths, tgt_in, y)
        y = y.to(device)
        with precision.autocast():
            logits = forward(*(part.to(device) for part in inputs))  # (B, T, V)
        token = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE,
                                reduction="none")  # (B·T,), 0 at IGNORE
        losses[torch.as_tensor(idx, dtype=torch.int64, device=device)] = \
            token.view(y.shape).double().sum(1)
    return losses


def loss(t: Components) -> float:
    """The token-mean loss over the run's validation set (t.val_size sequences)."""
    return losses(t)[0]


def losses(t: Components) -> tuple[float, dict[str, float]]:
    """loss(), and of a mixture each source's token-mean loss over its part of the set
    (name -> loss; {} for one source)."""
    t.replicas.module.eval()
    w, n = t.world, t.val_size
    each = sequence_losses(t.replicas.forward, t.val,
                           batches(n, t.val_batch_size, w.rank, w.size), n, t.device,
                           t.precision)
    t.replicas.module.train()
    sums = t.replicas.sum(each)
    spans = t.val.spans() if isinstance(t.val, Mixture) else {}
    parts = torch.stack([sums[first:end].sum() for first, end in spans.values()]
                        + [sums.sum()]).tolist()  # one read back
    total = parts.pop() / t.val.num_targets(np.arange(n))
    return total, {name: value / t.val.num_targets(np.arange(first, end)) for value, (name, (
        first, end)) in zip(parts, spans.items(), strict=True)}


def fingerprint(seqs: Sequences | Pairs, n: int) -> str:
    """Names the first n sequences of seqs: their token file, how it is cut, and n."""
    text = json.dumps([*seqs.identity(), n])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record(seqs: Sequences, n: int) -> dict:
    """meta.json's `validation`: the set a checkpoint's val/loss and best_val_loss are of."""
    return {"sequences": n, "targets": seqs.num_targets(np.arange(n)),
            "fingerprint": fingerprint(seqs, n)}


def describe(t: Components) -> str:
    """The run's log line about its validation set."""
    if isinstance(t.val, Mixture):
        first = f"the first {t.cfg.eval_sequences:,}" if t.cfg.eval_sequences else "all the"
        return (f"validation: {first} validation sequences of each source (" + ", ".join(
                    f"{name} {end - first:,} of {len(part.seqs):,}" for part, (name, (
                        first, end)) in zip(t.val.parts, t.val.spans().items(), strict=True))
                + f"), {t.val.num_targets(np.arange(t.val_size)):,} target tokens, every "
                  f"{t.cfg.eval_every} updates")
    n, available = t.val_size, len(t.val)
    which = f"all {n:,}" if n == available else f"the first {n:,} of {available:,}"
    return (f"validation: {which} validation {t.unit}, "
            f"{t.val.num_targets(np.arange(n)):,} target tokens, every {t.cfg.eval_every} "
            f"updates")


def deprecated(cfg: TrainerConfig, n: int, resumed: bool) -> list[str]:
    """The warning that trainer.eval_batches is the deprecated form of eval_sequences."""
    if cfg.eval_batches is None:
        return []
    means = ("the checkpoint's" if resumed else
             f"{cfg.eval_batches} x data.batch_size =")
    return [f"trainer.eval_batches={cfg.eval_batches} is deprecated: validation reads {means} "
            f"{n} sequences, the same whatever the batch size; write "
            f"trainer.eval_sequences={n}"]


def saved_set(meta: dict, t: Components) -> dict:
    """The validation set of the checkpoint whose meta.json is `meta`: its record, or for a
    checkpoint written before there was one, the set that trainrun then read (the first
    eval_batches windows of data.batch_size sequences per process)."""
    saved = meta.get("validation")
    if saved is None:
        old = meta["config"]["trainer"].get("eval_batches")
        batch, processes = meta["config"]["data"]["batch_size"], (t.saved_world or (1,))[0]
        if not all(type(v) is int and v > 0 for v in (old, batch, processes)):
            raise ValueError(f"validation: none recorded, and no eval_batches ({old!r}), "
                             f"batch_size ({batch!r}) and processes ({processes!r}) to derive "
                             f"it from")
        n = min(old * batch * processes, len(t.val))
        return {"sequences": n, "fingerprint": fingerprint(t.val, n)}
    available = t.val.available() if isinstance(t.val, Mixture) else len(t.val)
    if not (isinstance(saved, dict) and type(saved.get("sequences")) is int
            and 0 < saved["sequences"] <= available and isinstance(saved.get("fingerprint"), str)):
        raise ValueError(f"validation: {saved!r}, where trainrun writes the number of sequences "
                         f"(at most the {available:,} of the validation split) and a fingerprint")
    return saved


def resumed(t: Components, meta: dict) -> list[str]:
    """Continue from the checkpoint whose meta.json is `meta`: the deprecated eval_batches
    takes the checkpoint's set; a set other than the checkpoint's restarts best_val_loss and
    early stopping (the lines that say so), or is refused under a schedule driven by val/loss.
    Raises ValueError when meta.json's record is not trainrun's."""
    saved = saved_set(meta, t)
    if t.cfg.eval_batches is not None:
        t.val_size = saved["sequences"]
    notes = deprecated(t.cfg, t.val_size, resumed=True)
    if fingerprint(t.val, t.val_size) == saved["fingerprint"]:
        return notes
    was, now = saved["sequences"], t.val_size
    if t.schedule.cfg.uses_val_loss:
        raise ConfigError("trainer.eval_sequences", f"{now} validation sequences, where the "
                                                    f"checkpoint's val/loss history, which the "
                                                    f"schedule's rate depends on, is of {was}; "
                                                    f"allowed: trainer.eval_sequences={was}")
    c = t.counters
    best = (f"best_val_loss {c.best_val_loss:.4f} of update {c.best_val_step}"
            if c.best_val_step else "best_val_loss")
    c.val_loss, c.best_val_loss, c.best_val_step, c.val_sources = math.nan, math.inf, 0, {}
    return [*notes, f"validation now reads {now:,} sequences, the checkpoint's {was:,}: "
                    f"{best} and early stopping start over from this run's first validation, "
                    f"losses of other sequences not being comparable"]
