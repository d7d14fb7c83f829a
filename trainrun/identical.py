"""Which jobs of a sweep would train the same run: a swept key that the chosen options
ignore (optimizer.lr under scheduler=noam, whose rate does not depend on it; the fp16 loss
scaler's keys where the run trains in fp32 or bf16) makes jobs identical. Each distinct
configuration runs once; the sweep says which jobs repeat which, and why, before it
starts.

Two jobs are compared on what their runs use: every key's value and, for each group, the
option chosen (its schema: cosine and linear have the same keys but not the same curve).
The precision group is compared by the mode it trains in on this machine, since that is
all its option decides: precision=auto on a CPU is the fp32 run."""

from __future__ import annotations

import dataclasses
import json
import os

from trainrun.config import Config

ENV = "TRAINRUN_IDENTICAL_JOBS"  # {job: [the job it repeats, why]}, for the jobs to read
SCALER_KEYS = ("init_scale", "growth_factor", "backoff_factor", "growth_interval")
OPTION = "<option>"  # the key of a section's schema in `effective` (no field can be named so)


def effective(cfg: Config, precision_mode: str) -> tuple[dict, list[str]]:
    """The config as the run uses it, and the keys it ignores."""
    from trainrun.schedules import build_schedule

    flat = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):  # which option of the group, not only its keys
            flat[f.name][OPTION] = f"{type(section).__module__}.{type(section).__qualname__}"
    ignored = []
    t, lr = cfg.trainer, cfg.optimizer.lr
    a = build_schedule(cfg.scheduler, lr, t.max_steps, cfg.model.d_model)
    b = build_schedule(cfg.scheduler, lr * 2 if lr else 1.0, t.max_steps, cfg.model.d_model)
    probes = sorted({1, 2, t.max_steps // 2 or 1, t.max_steps})
    if all(a(k) == b(k) for k in probes):  # the schedule sets every update's rate itself
        flat["optimizer"].pop("lr", None)
        ignored.append("optimizer.lr")
    precision = {"mode": precision_mode}  # auto on a CPU is fp32
    for key in SCALER_KEYS:
        if key in flat["precision"]:
            if precision_mode == "fp16":
                precision[key] = flat["precision"][key]
            else:
                ignored.append(f"precision.{key}")
    flat["precision"] = precision
    return flat, ignored


def find(jobs: list[list[str]], configs: list[Config], modes: list[str]) -> dict[int, tuple]:
    """{job: (the earlier job it repeats, why)} for every job that repeats another."""
    seen: dict[str, int] = {}
    repeats = {}
    for num, (overrides, cfg, mode) in enumerate(zip(jobs, configs, modes, strict=True)):
        flat, ignored = effective(cfg, mode)
        key = json.dumps(flat, sort_keys=True, default=str)
        if key in seen:
            first = seen[key]
            differ = sorted(set(overrides) - set(jobs[first]))
            unused = [d for d in differ if d.split("=", 1)[0] in ignored]
            if unused:
                why = f"{', '.join(unused)}: not used by the options chosen"
            elif differ and all(d.split("=", 1)[0] == "precision" for d in differ):
                why = f"{', '.join(differ)}: the same {mode} run on this machine"
            else:  # values written differently, or a group's default named
                why = f"{', '.join(differ) or 'the same overrides'}: the same config as job {first}"
            repeats[num] = (first, why)
        else:
            seen[key] = num
    return repeats


def announce(repeats: dict[int, tuple]) -> list[str]:
    """Hand the repeats to the jobs (through the environment); the lines that say so."""
    os.environ[ENV] = json.dumps({str(k): list(v) for k, v in repeats.items()})
    return [f"job {num} is identical to job {first} ({why}); it is not run again"
            for num, (first, why) in repeats.items()]


def repeated(num: int) -> tuple[int, str] | None:
    """(the job it repeats, why) if job `num` of this sweep is not to run."""
    found = json.loads(os.environ.get(ENV, "{}")).get(str(num))
    return tuple(found) if found else None
