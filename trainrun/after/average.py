"""The average of a run's last checkpoints, which `trainrun-average` writes
(trainrun.commands.average; docs/after-training.md, trainrun-average).

The weights of the N newest intact step-* checkpoints are summed in float64 and divided by
N, each tensor cast back to its own dtype, so that N copies of one checkpoint give it back
bit for bit. A tensor that is not floating point (a count, a mask) must be the same in all
of them, and is kept as it is. Tied weights stay as the checkpoints store them:
model.safetensors holds each tied parameter under one name (trainrun.checkpoint), which is
averaged once. An FSDP checkpoint holds the whole weights in model.safetensors too (rank 0 writes them beside
its shards), so it is averaged the same way and its shards are never read.

The average is checkpoints/average-<first step>-<last step>/ (or a name of the user's), a
checkpoint with model.safetensors and meta.json only: meta.json marks it weights-only and
the average of which steps, and copies the newest checkpoint's config, schemas and tokenizer
record, which the commands after training check. Resume, pruning (trainer.keep_last) and
checkpoints/latest take only step-* folders, so none of them sees it. It is written into a
temporary folder and renamed into place when complete, under the run directory's lock
(trainrun.rundir.claim): a run still writing the directory refuses it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from trainrun import checkpoint, rundir
from trainrun.after.run import ARG, RUN_ALLOWED
from trainrun.cadence import BEST
from trainrun.errors import ConfigError, reason

NAME_KEY = "--checkpoint-name"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RESERVED = (checkpoint.LATEST, BEST)  # `latest` names the newest step; best/ is keep_best's
COPIED = ("config", "schemas", "tokenizer")  # what the commands after training read in meta.json


def default_name(steps: list[int]) -> str:
    """average-<first step>-<last step>, with the digits of the step-* names."""
    return f"average-{steps[0]:08d}-{steps[-1]:08d}"


def check_name(name: str) -> None:
    """A name for the average's folder in checkpoints/ that nothing else of a run takes:
    not step-N (resume would continue from it), `latest` or `best`."""
    if not NAME.fullmatch(name) or checkpoint.step_number(Path(name)) is not None \
            or name in RESERVED:
        raise ConfigError(NAME_KEY, f"got {name!r}; allowed: a folder name of letters, digits, "
                                    f"'.', '_' and '-' (not starting with '.' or '-'), other "
                                    f"than step-N, {', '.join(RESERVED)}")


def last_intact(run_dir: Path, n: int) -> tuple[list[Path], list[str]]:
    """The n newest intact step-* checkpoints of run_dir, oldest first, and a warning for
    each damaged one skipped among them. Fewer than n: ConfigError on --last."""
    found, warnings = [], []
    for path in reversed(checkpoint.complete(run_dir / "checkpoints")):
        problem = checkpoint.verify(path)
        if problem is not None:
            warnings.append(f"checkpoint {path} is damaged ({problem}); left out of the average")
            continue
        found.insert(0, path)
        if len(found) == n:
            return found, warnings
    if not found:
        raise ConfigError(ARG, f"{run_dir}: no intact checkpoint in {run_dir / 'checkpoints'}; "
                               f"allowed: {RUN_ALLOWED}")
    names = ", ".join(p.name for p in found)
    raise ConfigError("--last", f"got {n}, but {run_dir} has {len(found)} intact "
                                f"checkpoint(s) ({names}); allowed: 1 <= N <= {len(found)}")


def average(paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """The mean of the weights (model.safetensors) of the checkpoints `paths`, tensor by
    tensor: summed in float64, divided by their number, cast back to each tensor's dtype;
    and the newest file's metadata (save_model's record of the tied names it left out).
    ConfigError when they hold other names, shapes or dtypes, or when a tensor that is not
    floating point differs. One checkpoint's tensors are in memory at a time, beside the sums."""
    mean = Mean(paths[0] / checkpoint.MODEL_FILE)
    for path in paths:
        file = path / checkpoint.MODEL_FILE
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                mean.check_names(set(f.keys()), file)
                metadata = f.metadata()
                for name in f.keys():  # noqa: SIM118 (a safe_open is no dict)
                    mean.add(name, f.get_tensor(name), file)
        except (SafetensorError, OSError) as error:
            raise ConfigError(ARG, f"{file}: not a safetensors file ({reason(error)}); "
                                   f"allowed: {RUN_ALLOWED}") from None
    return mean.result(len(paths)), metadata


class Mean:
    """The running sums (float64) of the floating-point tensors, and the other tensors as
    the first checkpoint (`first`, its model.safetensors) holds them."""

    def __init__(self, first: Path):
        self.first = first
        self.sums: dict[str, torch.Tensor] = {}
        self.kept: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}

    def check_names(self, names: set[str], file: Path) -> None:
        if self.dtypes and names != set(self.dtypes):
            odd = sorted(names ^ set(self.dtypes))[0]
            where = file if odd in names else self.first
            raise ConfigError(ARG, f"{file}: other tensors than {self.first} ({odd} only in "
                                   f"{where}); allowed: checkpoints of one model")

    def add(self, name: str, tensor: torch.Tensor, file: Path) -> None:
        """Add `tensor` to the sum of `name`, or check it against the kept one."""
        seen = self.sums.get(name, self.kept.get(name))
        if seen is None:
            self.dtypes[name] = tensor.dtype
            if tensor.is_floating_point():
                self.sums[name] = tensor.to(torch.float64)
            else:
                self.kept[name] = tensor
            return
        if seen.shape != tensor.shape or self.dtypes[name] != tensor.dtype:
            raise ConfigError(ARG, f"{file}: {name} is {tensor.dtype} {tuple(tensor.shape)}, "
                                   f"{self.dtypes[name]} {tuple(seen.shape)} in {self.first}; "
                                   f"allowed: checkpoints of one model")
        if name in self.sums:
            self.sums[name].add_(tensor.to(torch.float64))
        elif not torch.equal(seen, tensor):
            raise ConfigError(ARG, f"{file}: {name} ({tensor.dtype}, not floating point, so "
                                   f"not averaged) differs from {self.first}'s; allowed: "
                                   f"checkpoints whose other tensors are equal")

    def result(self, n: int) -> dict[str, torch.Tensor]:
        """sum / n in float64, then each tensor's own dtype; the kept tensors as they are."""
        means = {name: (total / n).to(self.dtypes[name]) for name, total in self.sums.items()}
        return {**means, **self.kept}


def record(paths: list[Path]) -> dict:
    """The average's meta.json, without the sha256 and time that write() adds: the step of
    the newest checkpoint (what the commands after training report), the mark of a
    weights-only checkpoint, which steps it averages, and the newest one's COPIED records."""
    newest = checkpoint.read_meta(paths[-1])  # read by verify() already
    steps = [checkpoint.step_number(p) for p in paths]
    return {"step": steps[-1], checkpoint.WEIGHTS_ONLY: True,
            "average": {"steps": steps, "checkpoints": [p.name for p in paths],
                        "accumulated_in": "float64"},
            **{k: newest[k] for k in COPIED if k in newest}}


def write(root: Path, name: str, weights: dict[str, torch.Tensor], metadata: dict | None,
          meta: dict) -> Path:
    """Write the checkpoint root/name (weights with their safetensors `metadata`, and
    meta.json; fsynced) into a temporary folder and rename it into place; on any error
    remove the temporary folder, so nothing is left."""
    final, tmp = root / name, root / f".tmp-{name}-{os.getpid()}"  # a save cleans up .tmp-*
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / checkpoint.MODEL_FILE), metadata=metadata)
        digests = {checkpoint.MODEL_FILE: checkpoint.sha256(tmp / checkpoint.MODEL_FILE)}
        meta = {"step": meta["step"], "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "sha256": digests, **meta}
        (tmp / checkpoint.META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        for file in (checkpoint.MODEL_FILE, checkpoint.META_FILE):
            rundir.fsync(tmp / file)
        rundir.fsync(tmp)
        os.rename(tmp, final)  # refused if final exists (a folder with files)
        rundir.fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_average(run_dir: Path, n: int, name: str | None) -> tuple[list[Path], Path, list[str]]:
    """Average the n newest intact checkpoints of run_dir into checkpoints/<name> (default:
    default_name), holding the run directory's lock; return the checkpoints averaged, the
    new one, and warnings. Every problem is one ConfigError, with nothing written."""
    if name is not None:
        check_name(name)
    if not run_dir.is_dir():
        raise ConfigError(ARG, f"{run_dir}: no such directory; allowed: {RUN_ALLOWED}")
    root = run_dir / "checkpoints"
    if not root.is_dir():  # a link is refused by claim(), named
        raise ConfigError(ARG, f"{run_dir}: no checkpoints/ in it; allowed: {RUN_ALLOWED}")
    claim = rundir.claim(run_dir, ARG)  # refuses links, and a run still writing it
    try:
        paths, warnings = last_intact(run_dir, n)
        name = name or default_name([checkpoint.step_number(p) for p in paths])
        if os.path.lexists(root / name):
            raise ConfigError(NAME_KEY, f"{root / name} already exists; allowed: another "
                                        f"{NAME_KEY}, or that folder removed first")
        meta = record(paths)
        weights, metadata = average(paths)
        try:
            out = write(root, name, weights, metadata, meta)
        except (OSError, SafetensorError) as error:  # safetensors' own for a failed write
            raise ConfigError(ARG, f"cannot write {root / name} ({reason(error)}); nothing "
                                   f"was written") from None
    finally:
        claim.release()
    return paths, out, warnings
