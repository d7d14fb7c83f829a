"""Checkpoints (docs/long-jobs.md, Checkpoints): checkpoints/step-XXXXXXXX/ with model.safetensors,
trainer_state.pt and meta.json (and model_ema.safetensors, the weights' moving average, with
trainer.ema_decay), and checkpoints/latest naming the newest complete one.
Other folders beside them (best/, average-*/) are for the commands after training: resume,
pruning and `latest` only ever take step-* folders.

A checkpoint is written into a temporary directory, its files fsynced, then renamed into
place, and only then is `latest` replaced (also by rename), so a crash during a save leaves
the previous checkpoint intact. meta.json holds the sha256 of every file. Loading never
unpickles arbitrary objects: safetensors for the weights, torch.load(weights_only=True)
for the rest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_file, save_model

from trainrun import faults, rundir
from trainrun.errors import NotTrainrun, out_of_space, reason

MODEL_FILE, STATE_FILE, META_FILE, LATEST = "model.safetensors", "trainer_state.pt", "meta.json", "latest"
EMA_FILE = "model_ema.safetensors"  # trainer.ema_decay: the average, as model.safetensors is stored
SHARDS = "sharded"  # trainer.strategy=fsdp: torch.distributed.checkpoint's files of every rank
# meta.json's mark of a checkpoint with weights and no trainer state (trainrun-average's),
# honoured only outside the step-* folders that resume reads
WEIGHTS_ONLY = "weights_only"


def step_name(k: int) -> str:
    """At least 8 digits (the runs written so far), more from update 10^8 on."""
    return f"step-{k:08d}"


def step_number(path: Path) -> int | None:
    """k of a checkpoint directory named step_name(k); None for any other name."""
    match = re.fullmatch(r"step-(\d+)", path.name)
    return int(match.group(1)) if match else None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class NoSpace(Exception):
    """The disk (or the quota) filled up (ENOSPC, EDQUOT) while the run wrote something:
    `previous`, the newest checkpoint (None if there is none), is intact and named by
    `latest`. str() is one line: what failed, the space needed if known, what is intact."""

    def __init__(self, error: OSError, doing: str, previous: Path | None):
        self.previous = previous
        reason = error.strerror or os.strerror(error.errno)
        intact = (f"the previous checkpoint {previous.name} is intact and checkpoints/{LATEST} "
                  f"names it" if previous is not None else "there is no earlier checkpoint")
        super().__init__(f"{reason[:1].lower()}{reason[1:]} while {doing}; {intact}")

    @classmethod
    def outside_saves(cls, error: OSError, root: Path) -> NoSpace:
        """A full disk met by another write of the run (TensorBoard's events, train.log)."""
        previous = complete(root)
        return cls(error, f"writing {error.filename or 'to the run directory'}",
                   previous[-1] if previous else None)


def save(root: Path, k: int, model: torch.nn.Module | dict[str, torch.Tensor], state: dict,
         meta: dict, keep_last: int, tmp: Path | None = None,
         ema: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint k atomically under root (checkpoints/), point `latest` at it, and
    keep the keep_last newest. `model`: the module, or its whole weights by name; `ema`: the
    whole weights of the average by name (None: the run keeps none). `tmp`:
    the temporary directory, when it already holds the shards of save_sharded(). Raises
    NoSpace, with the partial save removed, when the disk fills up before `latest` names
    the new checkpoint."""
    final = root / step_name(k)
    tmp = tmp or root / f".tmp-{step_name(k)}-{os.getpid()}"
    try:
        rundir.folder(root, within=root.parent)
        clean(root, keep=tmp)
        _write(tmp, k, model, state, meta, ema)
        _put_in_place(tmp, final)
        rundir.fsync(root)
        # by rename: the save is complete once `latest` names it
        rundir.write(root / LATEST, final.name + "\n", within=root.parent, sync=True)
    except Exception as error:
        full = out_of_space(error)
        if full is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space, and so does:
        shutil.rmtree(final, ignore_errors=True)  # renamed, but `latest` does not name it yet
        raise _no_space(full, k, root, model, state) from None
    rundir.fsync(root)
    _prune(root, keep_last)
    return final


def save_sharded(root: Path, k: int, replicas, optimizer: torch.optim.Optimizer, state: dict,
                 meta: dict, keep_last: int, main: bool, ema=None) -> None:
    """save() for trainer.strategy=fsdp, called on every rank: each rank writes its shards
    of the model and optimizer (torch.distributed.checkpoint) into the temporary directory,
    rank 0 the whole weights (model.safetensors) and the rest, then puts it in place. `ema`
    (trainrun.ema.Ema, or None): its shards are written with the model's, and rank 0 its
    whole weights (model_ema.safetensors)."""
    import torch.distributed.checkpoint as dcp

    tmp = root / f".tmp-{step_name(k)}-sharded"  # one name on every rank
    if main:
        rundir.folder(root, within=root.parent)
        clean(root)
        tmp.mkdir()  # new: it holds no link
    replicas.barrier()
    dcp.save(replicas.sharded_state(optimizer, ema), checkpoint_id=str(tmp / SHARDS))
    weights = replicas.full_weights()
    average = None
    if ema is not None:
        with ema.swapped_in():
            average = replicas.full_weights()
    if main:
        save(root, k, weights, state, meta, keep_last, tmp=tmp, ema=average)
    replicas.barrier()


def clean(root: Path, keep: Path | None = None) -> None:
    """Remove what a process killed while saving left behind (a link: the link alone)."""
    for leftover in [*root.glob(".tmp-*"), *root.glob(".old-*")]:
        if leftover == keep:
            continue
        if leftover.is_symlink() or not leftover.is_dir():
            leftover.unlink(missing_ok=True)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def files(path: Path) -> list[str]:
    """The files of checkpoint directory `path` that meta.json lists, relative to it."""
    shards = path / SHARDS
    extra = sorted(str(f.relative_to(path)) for f in shards.rglob("*") if f.is_file()) \
        if shards.is_dir() else []
    average = [EMA_FILE] if (path / EMA_FILE).is_file() else []
    return [MODEL_FILE, *average, STATE_FILE, *extra]


def _write(tmp: Path, k: int, model: torch.nn.Module | dict, state: dict, meta: dict,
           ema: dict | None = None) -> None:
    """The checkpoint's files in the directory tmp (new, or made by save_sharded), fsynced."""
    if not tmp.is_dir() or tmp.is_symlink():
        tmp.mkdir()
    _save_weights(model, tmp / MODEL_FILE)
    if ema is not None:
        _save_weights(ema, tmp / EMA_FILE)
    faults.disk_full_in_save(k, tmp / STATE_FILE)  # tests: the disk fills up here
    with open(tmp / STATE_FILE, "wb") as f:  # a file object: a full disk raises OSError,
        torch.save(state, f)  # not only a RuntimeError as with a path
    digests = {name: sha256(tmp / name) for name in files(tmp)}
    meta = {"step": k, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "sha256": digests, **meta}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    faults.pause_in_save()  # tests: a pause with the checkpoint half written
    for name in [*digests, META_FILE]:
        rundir.fsync(tmp / name)
    if (tmp / SHARDS).is_dir():
        rundir.fsync(tmp / SHARDS)
    rundir.fsync(tmp)


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename tmp to final. A directory already there (not this run's state: a run saves
    each update once) is replaced, never kept in place of the new checkpoint."""
    if not final.exists():
        os.rename(tmp, final)
        return
    old = final.with_name(f".old-{final.name}-{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _save_weights(model: torch.nn.Module | dict, path: Path) -> None:
    """safetensors' save_model (it drops the tied head's duplicate name, which load_model
    restores) or, for weights by name, save_file; with a full disk raised as the OSError it
    is: safetensors reports it as SafetensorError("... (os error 28)"), in the words of
    Rust's std::io::Error."""
    try:
        if isinstance(model, dict):
            save_file(model, str(path))
        else:
            save_model(model, str(path))
    except SafetensorError as error:
        found = re.search(r"\(os error (\d+)\)", str(error))
        code = int(found.group(1)) if found else None
        if code not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise OSError(code, os.strerror(code), str(path)) from error


def _no_space(error: OSError, k: int, root: Path, model: torch.nn.Module,
              state: dict) -> NoSpace:
    """The error for a save of update k that ran out of space: the previous checkpoint's
    size is the best estimate of what the save needs (same model, same optimizer state);
    without one, the bytes of the tensors it holds (a lower bound)."""
    earlier = [p for p in complete(root) if step_number(p) < k]
    previous = earlier[-1] if earlier else None
    if previous is not None:
        needed = sum(f.stat().st_size for f in previous.iterdir() if f.is_file())
        source = f"the size of {previous.name}"
    else:
        needed = _tensor_bytes(model.state_dict()) + _tensor_bytes(state)
        source = "its tensors alone"
    return NoSpace(error, f"saving checkpoint {step_name(k)} (update {k}) in {root}; it needs "
                          f"about {_size(needed)} ({source}), {_size(_free(root))} free",
                   previous)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _free(path: Path) -> int:
    """Free bytes on the file system of path (or of its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _prune(root: Path, keep_last: int) -> None:
    for old in complete(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def complete(root: Path) -> list[Path]:
    """The checkpoint directories under root, oldest first (temporary ones excluded).

    Ordered by update number, not by name: from 10^8 on the names have more digits, and
    "step-100000000" sorts before "step-99999999" as text."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and step_number(p) is not None]
    return sorted(found, key=step_number)


def verify(path: Path) -> str | None:
    """None if checkpoint `path` is intact, else what is wrong with it: every file that
    meta.json lists is there with its sha256, and it lists exactly the checkpoint's files
    (trainer_state.pt too, unless it is a weights-only checkpoint beside the step-* ones)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
        listed = files(path)
        if meta.get(WEIGHTS_ONLY) is True and step_number(path) is None:
            listed.remove(STATE_FILE)
        if sorted(meta["sha256"]) != sorted(listed):
            return f"{META_FILE} does not list exactly the files of the checkpoint"
        for name, digest in meta["sha256"].items():
            if not (path / name).is_file():
                return f"{name} is missing"
            if sha256(path / name) != digest:
                return f"{name} does not match its sha256 in {META_FILE}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"{META_FILE} is unreadable ({exc})"
    return None


def read_meta(path: Path) -> dict:
    return json.loads((path / META_FILE).read_text())


def load(path: Path, model: torch.nn.Module, replicas=None,
         optimizer: torch.optim.Optimizer | None = None, ema=None) -> dict:
    """Load the weights into `model` and return the trainer state. Under
    trainer.strategy=fsdp (`replicas` sharded) the sharded checkpoint is read by every rank
    into its shards of the model and of the optimizer, whatever the number of ranks that
    wrote it; a run of any other strategy never reads sharded/ (resume.locate refuses a
    checkpoint that holds one). `ema` (trainrun.ema.Ema, or None): the checkpoint's average
    is loaded into it when it has one (has_ema), else it keeps the loaded weights."""
    average = ema is not None and has_ema(path)
    if replicas is not None and replicas.sharded:
        replicas.load_sharded(path / SHARDS, optimizer, ema if average else None)
    else:
        if average:
            with ema.swapped_in():  # the model's own weights are loaded after it
                load_weights(path, model, EMA_FILE)
                ema.capture()
        load_weights(path, model)
    if ema is not None and not average:
        ema.capture()
    try:
        return plain(path / STATE_FILE)
    except Exception as error:  # whatever a file that torch.save did not write raises
        raise NotTrainrun(f"{path / STATE_FILE}: not a trainer state ({reason(error)})") from None


def plain(source) -> object:
    """torch.load(weights_only=True) of a path or buffer, without its warnings (a pickle
    protocol it did not write, for one): a refused file is one line, raised by the caller."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(source, map_location="cpu", weights_only=True)


def has_ema(path: Path) -> bool:
    """Checkpoint `path` holds the weights' moving average (trainer.ema_decay was set)."""
    return (path / EMA_FILE).is_file()


def load_weights(path: Path, model: torch.nn.Module, name: str = MODEL_FILE) -> None:
    """The weights of checkpoint `path` into `model` (`name`: EMA_FILE for their average);
    NotTrainrun when the file is not a safetensors file or holds other tensors than the
    model's (names or shapes)."""
    file = path / name
    try:
        missing, unexpected = load_model(model, str(file), strict=False,
                                         device=str(next(model.parameters()).device))
    except (SafetensorError, RuntimeError, OSError) as error:  # a header, a size mismatch
        raise NotTrainrun(f"{file}: not this model's weights ({reason(error)})") from None
    if missing or unexpected:
        listed = ", ".join([*(f"{n} missing" for n in sorted(missing)[:2]),
                            *(f"{n} not in the model" for n in sorted(unexpected)[:2])])
        raise NotTrainrun(f"{file}: not this model's weights ({listed})")
