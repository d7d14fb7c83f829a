"""Whether a run's model fits on its device, estimated from the config before anything is
built or written: a model of 100,000 layers is refused in a second, instead of allocating
for minutes and failing after its run directory exists.

The estimate is a floor: the fp32 parameters, their gradients and the optimizer's state
(as many fp32 values per parameter as the configured optimizer really keeps, measured on a
tiny model). Activations come on top, so a run close to the limit gets a warning."""

from __future__ import annotations

import os

import torch

from trainrun.config import Config
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.errors import ConfigError
from trainrun.models import ModelConfig

WARN_AT = 0.8  # of the device's memory
MOST_STATE = 4  # values per parameter, more than any optimizer option keeps (tests check)


def state_per_parameter(cfg: Config) -> float:
    """Values of optimizer state per parameter (AdamW 2, SGD with momentum 1, ...): one step
    of the configured optimizer on a tiny model, its state counted."""
    from trainrun.optimizers import build_optimizer

    tiny = cfg.model.tiny().build(ByteTokenizer.vocab_size)  # the family's modules
    optimizer = build_optimizer(cfg.optimizer, tiny, torch.device("cpu"))
    for p in tiny.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    per_param = [t.numel() for state in optimizer.state.values() for t in state.values()
                 if torch.is_tensor(t) and t.numel() > 1]
    return sum(per_param) / sum(p.numel() for p in tiny.parameters())  # padding rows too


def available(device: torch.device) -> tuple[int, str]:
    """Bytes this process may use on device, and what they are."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return total, f"{torch.cuda.get_device_name(device)}'s memory"
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = f" shared by {processes} processes" if processes > 1 else ""
    return free // processes, f"available RAM{share}"


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def sizes(model: ModelConfig) -> str:
    """The model keys that size its weights (the shape keys but heads and switches)."""
    keys = [k for k in model.shape_keys
            if "heads" not in k and type(getattr(model, k)) is not bool]
    return ", ".join(f"model.{k}" for k in keys)


def check(cfg: Config, device: torch.device, processes: int = 1) -> str | None:
    """Refuse a model that cannot fit (ConfigError naming both figures); return a warning
    when it comes close, else None. `processes`: over how many the state is sharded."""
    # the tokenizer's ids as its config tells before it is built: bpe's vocab_size, else
    # the byte tokenizer's (a floor for an hf tokenizer, read only when the data is built)
    params = cfg.model.num_params(getattr(cfg.tokenizer, "vocab_size", ByteTokenizer.vocab_size))
    sharded = processes if cfg.trainer.strategy == "fsdp" else 1
    have, what = available(device)
    if params * 4 * (2 + MOST_STATE) / sharded <= WARN_AT * have:
        return None  # fits whatever the optimizer keeps: its state is not measured (a second)
    per_param = 4 * (2 + state_per_parameter(cfg))  # fp32 weights, grads, optimizer state
    need = params * per_param / sharded
    figures = (f"{params:,} parameters x {per_param:g} bytes (weights, gradients, optimizer "
               f"state) need {gib(need)}")
    if need > have:
        raise ConfigError("model", f"too large for this machine: {figures}, more than the "
                                   f"{gib(have)} of {what}; allowed: a smaller model "
                                   f"({sizes(cfg.model)})")
    if need > WARN_AT * have:
        return (f"the model is close to the limit: {figures} of the {gib(have)} of {what}, "
                f"before activations")
    return None
