"""data=mix: several sources, each any data= option of documents, drawn by weight
(docs/data.md, Mixtures).

The training stream is one seeded sequence of draws: position p of it takes its source from
the weights (a uniform number of block p // BLOCK, seeded by (seed, block), against the
weights' cumulative sum) and its sequence from that source's own order (order.DataOrder,
seeded by (seed, source)), so it never depends on batch size, accumulation or the number of
processes. Each source counts its epochs apart: a small source repeats while a large one is
still on its first pass. The position (p and each source's epoch and offset) is the
checkpoint's `order`; new weights on resume draw the positions after p by the new weights,
each source continuing where it was.

Validation reads the first trainer.eval_sequences sequences of each source's validation
split: val/<name>/loss for each, and val/loss over all of them together (their summed loss
over their targets, whatever the weights, so that runs with other weights compare on the
same sequences by the same rule).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainrun.data.order import DataOrder
from trainrun.data.sequences import Sequences
from trainrun.data.sources import DATA, DataConfig
from trainrun.errors import ConfigError
from trainrun.registry import register

BLOCK = 4096  # draws per seeded block of the source choices
MIX_SEED = 0x6D6978  # "mix": the choices' stream, apart from every source's own order
SHARED = ("batch_size", "seq_len", "document_mask", "tokenize_workers")  # the mixture's
ENTRY = ("data", "weight")  # a source entry's own keys; the rest are its option's


@register("data", "mix")
@dataclass
class MixDataConfig(DataConfig):
    """Sources by name, each `{data: <option>, weight: <w>, <that option's keys>}`; the
    mixture's packing, val_fraction and max_documents are every source's unless it sets its
    own, and its batch_size and seq_len are every source's."""

    # name -> entry: a dict open to new keys (not in Hydra's struct mode), so that a source
    # or a key of one is added on the command line without `+`: data.sources.web.weight=2
    sources: Any = field(default_factory=lambda: DictConfig({}, flags={"struct": False}))

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        self.parts(prefix)

    def weights(self, prefix: str = "data") -> dict[str, float]:
        """name -> weight, checked: numbers >= 0, not all zero."""
        if not isinstance(self.sources, dict) or not self.sources:
            raise ConfigError(f"{prefix}.sources", f"got {self.sources!r}; allowed: sources by "
                              f"name, e.g. data.sources='{{web: {{data: text, files: web/*.txt, "
                              f"weight: 3}}, code: {{data: text, files: code/*.txt, weight: 1}}}}'")
        out = {}
        for name, entry in self.sources.items():
            key = f"{prefix}.sources.{name}"
            if not isinstance(entry, dict):
                raise ConfigError(key, f"got {entry!r}; allowed: {{data: <option>, weight: "
                                       f"<number>, ...that option's keys}}")
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not np.isfinite(weight) or weight < 0:
                raise ConfigError(f"{key}.weight", f"got {weight!r}; allowed: a number >= 0")
            out[str(name)] = float(weight)
        if sum(out.values()) <= 0:
            raise ConfigError(f"{prefix}.sources", f"the weights sum to 0 ({out}); allowed: "
                                                   f"weights >= 0 with a positive sum")
        return out

    def parts(self, prefix: str = "data") -> dict[str, DataConfig]:
        """name -> that source's validated DataConfig: its option's schema and YAML defaults,
        then the mixture's shared keys, then the entry's own."""
        weights = self.weights(prefix)
        options = [name for name, schema in DATA.items()
                   if schema.task == "lm" and schema is not MixDataConfig]
        out = {}
        for name in weights:
            key, entry = f"{prefix}.sources.{name}", dict(self.sources[name])
            option = entry.pop("data", None)
            entry.pop("weight", None)
            if option not in options:
                raise ConfigError(f"{key}.data", f"got {option!r}; allowed: a data option of "
                                                 f"documents: {', '.join(options)}")
            if entry.get("streaming"):
                raise ConfigError(f"{key}.streaming", "true: a mixture draws from token files; "
                                                      "allowed: false (a stream is a run's only "
                                                      "source)")
            for shared in SHARED:
                if shared in entry:
                    raise ConfigError(f"{key}.{shared}", f"data.{shared} is the mixture's, the "
                                      f"same for every source; allowed: data.{shared}=... for "
                                      f"the whole mixture")
            out[name] = _source_config(DATA[option], option, key, entry, {
                k: getattr(self, k) for k in ("batch_size", "seq_len", "packing",
                                              "val_fraction", "max_documents")})
            out[name].validate(key)
        return out

    def describe(self) -> str:
        weights = self.weights()
        total = sum(weights.values())
        return "mixture of " + ", ".join(f"{name} ({w / total:.1%})" for name, w in
                                         weights.items())


def _source_config(schema: type[DataConfig], option: str, key: str, entry: dict,
                   shared: dict) -> DataConfig:
    """The option's schema with its conf/data/<option>.yaml values, the mixture's, then the
    entry's; one ConfigError line naming the entry's key when one is unknown or missing."""
    defaults = OmegaConf.load(str(resources.files("trainrun.conf") / "data" / f"{option}.yaml"))
    defaults.pop("defaults", None)
    node = OmegaConf.structured(schema)
    allowed = set(node.keys())
    for name in entry:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}", f"unknown key of data={option}; allowed keys "
                              f"here: {', '.join(sorted(allowed - set(SHARED)) + list(ENTRY))}")
    try:
        node = OmegaConf.merge(node, defaults, shared, entry)
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", None)
        raise ConfigError(f"{key}.{where}" if where else key,
                          str(exc).splitlines()[0]) from None


class Mixture:
    """The sequences of several sources as one index space, source after source: what the
    loop and validation read as they read one Sequences (`batch`, `num_targets`, `len`).
    `weights`: name -> weight, for the training order (make_order)."""

    def __init__(self, parts: dict[str, Sequences], weights: dict[str, float] | None = None):
        self.names, self.parts, self.weights = list(parts), list(parts.values()), weights
        sizes = [len(p) for p in self.parts]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.seq_len = self.parts[0].seq_len
        self.record = {
            "documents": {n: (p.record or {}).get("documents") for n, p in parts.items()},
            "tokens": hashlib.sha256(json.dumps(
                [[n, (p.record or {}).get("tokens")] for n, p in parts.items()]).encode()
            ).hexdigest(),
            "count": sum((p.record or {}).get("count", 0) for p in self.parts)}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def available(self) -> int:
        """The sequences of the splits its parts are taken from (heads() keeps the first of
        each): what a validation set may be drawn from."""
        return sum(len(getattr(p, "seqs", p)) for p in self.parts)

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts, indices, side="right") - 1

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Each source's rows from its own Sequences, in the order of `indices`."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) == 0:  # a rank's empty micro-batch at the end of a validation
            return self.parts[0].batch(indices)
        which = self.source_of(indices)
        out = None
        for i in np.unique(which):
            rows = np.flatnonzero(which == i)
            got = self.parts[i].batch(indices[rows] - self.starts[i])
            if out is None:
                out = [torch.empty((len(indices), *g.shape[1:]), dtype=g.dtype) for g in got]
            for whole, part in zip(out, got, strict=True):
                whole[torch.from_numpy(rows)] = part
        return tuple(out)

    def num_targets(self, indices: np.ndarray) -> int:
        indices = np.asarray(indices, dtype=np.int64)
        which = self.source_of(indices)
        return sum(p.num_targets(indices[which == i] - self.starts[i])
                   for i, p in enumerate(self.parts) if (which == i).any())

    def identity(self) -> list:
        return [[n, *p.identity()] for n, p in zip(self.names, self.parts, strict=True)]

    def spans(self) -> dict[str, tuple[int, int]]:
        """name -> (first, end) of its indices."""
        return {n: (int(self.starts[i]), int(self.starts[i + 1]))
                for i, n in enumerate(self.names)}

    def heads(self, sizes: dict[str, int]) -> Mixture:
        """The first sizes[name] sequences of each source, as a Mixture (validation's set)."""
        return Mixture({n: _Head(p, sizes[n]) for n, p in zip(self.names, self.parts,
                                                              strict=True)})

    def make_order(self, seed: int) -> MixOrder:
        return MixOrder([len(p) for p in self.parts], self.names, self.weights, seed)


class _Head:
    """The first n sequences of a Sequences."""

    def __init__(self, seqs: Sequences, n: int):
        self.seqs, self.n, self.seq_len, self.record = seqs, n, seqs.seq_len, seqs.record

    def __len__(self) -> int:
        return self.n

    def batch(self, indices):
        return self.seqs.batch(indices)

    def num_targets(self, indices) -> int:
        return self.seqs.num_targets(indices)

    def identity(self) -> list:
        return [*self.seqs.identity(), self.n]


class MixOrder:
    """The mixture's position: the draws made (p) and each source's DataOrder; next_window,
    state_dict and load_state_dict as DataOrder's."""

    def __init__(self, sizes: list[int], names: list[str], weights: dict[str, float],
                 seed: int):
        self.sizes, self.names, self.seed = sizes, names, seed
        self.drawn = 0
        self.orders = [DataOrder(n, _source_seed(seed, name)) for n, name in zip(
            sizes, names, strict=True)]
        self.set_weights(weights)
        self.notes: list[str] = []  # what a resume with other weights changed

    def set_weights(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)
        w = np.array([weights[n] for n in self.names], dtype=np.float64)
        self._cdf = np.cumsum(w / w.sum())
        self._block, self._choices = -1, None

    def choices(self, first: int, count: int) -> np.ndarray:
        """The sources of draws first .. first + count - 1."""
        out = np.empty(count, dtype=np.int64)
        at = 0
        while at < count:
            block, within = divmod(first + at, BLOCK)
            if block != self._block:
                u = np.random.default_rng([self.seed, MIX_SEED, block]).random(BLOCK)
                self._choices = np.minimum(np.searchsorted(self._cdf, u, side="right"),
                                           len(self.names) - 1)
                self._block = block
            take = min(count - at, BLOCK - within)
            out[at:at + take] = self._choices[within:within + take]
            at += take
        return out

    def next_window(self, size: int) -> np.ndarray:
        """The next `size` draws as indices into the Mixture (source i's start added)."""
        which = self.choices(self.drawn, size)
        self.drawn += size
        out = np.empty(size, dtype=np.int64)
        start = 0
        for i, order in enumerate(self.orders):
            rows = np.flatnonzero(which == i)
            if len(rows):
                out[rows] = _take(order, len(rows)) + start
            start += self.sizes[i]
        return out

    def seen(self) -> dict[str, dict]:
        """Per source: the sequences drawn from it and the epochs they make."""
        out = {}
        for name, order, n in zip(self.names, self.orders, self.sizes, strict=True):
            sequences = order.epoch * n + order.offset
            out[name] = {"sequences": sequences, "epochs": round(sequences / n, 4)}
        return out

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "weights": dict(self.weights),
                "sources": {n: o.state_dict() for n, o in zip(self.names, self.orders,
                                                               strict=True)}}

    def load_state_dict(self, state: dict) -> None:
        drawn, sources = state["drawn"], state["sources"]
        if type(drawn) is not int or drawn < 0:
            raise ValueError(f"order: drawn {drawn!r}; a mixture's position is a whole number "
                             f">= 0")
        if sorted(sources) != sorted(self.names):
            raise ConfigError("data.sources", f"{', '.join(self.names)}; the checkpoint's "
                              f"mixture has {', '.join(sources)}; allowed: its sources")
        for name, order in zip(self.names, self.orders, strict=True):
            order.load_state_dict(sources[name])
        self.drawn = drawn
        saved = {str(k): float(v) for k, v in state["weights"].items()}
        if saved != self.weights:
            self.notes = [f"data.sources weights now {_shares(self.weights)}, the checkpoint's "
                          f"{_shares(saved)}: the draws after {drawn:,} follow the new weights, "
                          f"each source continuing from its position"]


def _take(order: DataOrder, n: int) -> np.ndarray:
    """The next n indices of a source's order, across as many of its epochs as they span."""
    got, have = [], 0
    while have < n:
        got.append(order.next_window(n - have))
        have += len(got[-1])
    return np.concatenate(got).astype(np.int64)


def _shares(weights: dict[str, float]) -> str:
    return ", ".join(f"{n} {w:g}" for n, w in weights.items())


def _source_seed(seed: int, name: str) -> int:
    """Each source's own order seed, from the run's seed and the source's name."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")
