"""Reading a sharded checkpoint (trainer.strategy=fsdp: checkpoints/step-N/sharded/)
without unpickling arbitrary objects.

torch.distributed.checkpoint (DCP) keeps its index, sharded/.metadata, as a pickle, and
reads the state's plain values (the optimizer's param_groups) with
torch.load(weights_only=False): both run whatever a planted file asks for, and meta.json's
sha256 is no defence, since whoever plants a file can rewrite it. Here the index is read by
an unpickler that knows only DCP's own metadata classes and the few torch and pathlib
values they hold, and the plain values with torch.load(weights_only=True), like
trainer_state.pt. Anything else is refused (NotTrainrun) before DCP reads a shard.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)

from trainrun import checkpoint
from trainrun.errors import NotTrainrun, reason

METADATA = ".metadata"
SHARD = re.compile(r"__\d+_\d+\.distcp")  # the name DCP's FileSystemWriter gives a shard

# Every global a .metadata written by DCP (torch 2.x) refers to, found by listing those of
# real ones: dtypes besides (any torch.dtype, by name).
_DCP = "torch.distributed.checkpoint"
ALLOWED = {
    *((f"{_DCP}.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING")),
    (f"{_DCP}.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name, e.g. "torch.strided"
    ("pathlib", "PosixPath"),  # StorageMeta.checkpoint_id: where it was written
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise NotTrainrun(f"refers to {module}.{name}, which DCP's metadata never holds")


def read_metadata(folder: Path) -> Metadata:
    """DCP's index of the shards in `folder`, checked: only DCP's own classes, and shards
    that are files of `folder` itself. Raises NotTrainrun naming the file otherwise."""
    path = folder / METADATA
    try:
        with open(path, "rb") as f:
            metadata = _Unpickler(f).load()
    except NotTrainrun as error:
        raise NotTrainrun(f"{path}: {error}; nothing in it was run") from None
    except Exception as error:  # whatever a malformed pickle raises
        raise NotTrainrun(f"{path}: not DCP's metadata ({reason(error)})") from None
    problem = _problem(metadata, folder)
    if problem is not None:
        raise NotTrainrun(f"{path}: {problem}")
    return metadata


def _problem(metadata, folder: Path) -> str | None:
    """What makes `metadata` other than the index DCP writes for trainrun's shards."""
    if not isinstance(metadata, Metadata):
        return f"holds a {type(metadata).__name__}, not DCP's Metadata"
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict) or not all(
            isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata))
            for k, v in entries.items()):
        return "its state_dict_metadata is not DCP's"
    if not isinstance(metadata.storage_meta, (StorageMeta, type(None))):
        return "its storage_meta is not DCP's"
    if not isinstance(metadata.storage_data, dict):
        return "its storage_data is not DCP's"
    for info in metadata.storage_data.values():
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, str):
            return "its storage_data is not DCP's"
        if not SHARD.fullmatch(info.relative_path) or not (folder / info.relative_path).is_file():
            return f"names the shard {info.relative_path!r}; allowed: a __R_N.distcp file beside it"
        if info.transform_descriptors:  # trainrun writes no compressed or encoded shards
            return f"asks for transforms {info.transform_descriptors!r} that trainrun never writes"
    return None


class Reader(FileSystemReader):
    """DCP's reader of `folder`, given its checked index (read_metadata)."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.metadata = read_metadata(folder)

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never falls back to
        # reading a per-rank __N.metadata file with pickle
        if self.metadata.storage_meta is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class Planner(DefaultLoadPlanner):
    """DCP's default load planner, reading plain values with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            value = checkpoint.plain(value)
        except Exception as error:  # an UnpicklingError names the global it refused
            raise NotTrainrun(f"{read_item.dest_index.fqn}: not a plain value "
                              f"({reason(error)})") from None
        # DefaultLoadPlanner places the value where it belongs (it unflattens the state);
        # it reads it back from this copy, written here from plain values only
        copy = io.BytesIO()
        torch.save(value, copy)
        copy.seek(0)
        super().load_bytes(read_item, copy)
