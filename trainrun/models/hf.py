"""A family's Hugging Face format: the folder `trainrun-export` writes and
`model.init_from` reads (config.json and model.safetensors, as `save_pretrained` writes
them), one Adapter per family that has one (gpt_hf.py, llama_hf.py).

An adapter names the folder's shape keys (model.<key> <- config.json's key), checks that a
folder is a model the chosen option computes, copies its weights in, and writes a model
out in fp32. Only config.json (JSON) and model.safetensors (raw tensors) are read: nothing
in the folder is code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainrun.checkpoint import MODEL_FILE, sha256
from trainrun.errors import ConfigError

if TYPE_CHECKING:
    import torch.nn as nn

    from trainrun.models.base import ModelConfig

CONFIG_FILE = "config.json"
KEY = "model.init_from"


class Adapter:
    """One family's Hugging Face format; subclasses give the names and the conversions."""

    model_type: str  # config.json's model_type
    architecture: str  # the transformers class, config.json's architectures[0]
    # model.<key> <- config.json's key, for the keys that a folder's shape gives
    shape_names: dict[str, str]

    @property
    def allowed(self) -> str:
        return (f"a Hugging Face {self.architecture} folder (config.json, model.safetensors), "
                f"such as trainrun-export writes")

    def read_config(self, path: str) -> tuple[Path, dict]:
        """The folder and its config.json, each problem one ConfigError naming model.init_from."""
        folder, hf = read_config(path, self.allowed)
        if hf.get("model_type") != self.model_type:
            raise ConfigError(KEY, f"{folder / CONFIG_FILE}: model_type "
                                   f"{hf.get('model_type')!r}; allowed: {self.allowed}")
        return folder, hf

    def shape(self, folder: Path, hf: dict) -> dict[str, Any]:
        """The model.* keys that config.json `hf` gives (ConfigError for a missing or
        wrong value)."""
        raise NotImplementedError

    def name_of(self, key: str, hf: dict) -> str:
        """config.json's name for model.<key>, for messages."""
        return self.shape_names[key]

    def check(self, cfg: ModelConfig, vocab_size: int) -> dict:
        """config.json of cfg.init_from, checked against cfg: the same shape, the
        tokenizer's vocabulary, and nothing the family does not compute."""
        folder, hf = self.read_config(cfg.init_from)
        theirs = self.shape(folder, hf)
        if any(getattr(cfg, k) != v for k, v in theirs.items()):
            k = next(k for k, v in theirs.items() if getattr(cfg, k) != v)
            raise ConfigError(KEY, f"{folder} holds a model of another shape: {CONFIG_FILE} "
                                   f"gives {self.name_of(k, hf)} {theirs[k]!r}, the chosen model "
                                   f"has model.{k}={getattr(cfg, k)!r}; allowed: the folder's "
                                   f"shape, {' '.join(f'model.{k}={v}' for k, v in theirs.items())}")
        if hf.get("vocab_size") != vocab_size:
            raise ConfigError(KEY, f"{folder}: vocab_size {hf.get('vocab_size')!r} "
                                   f"({CONFIG_FILE}); the tokenizer gives {vocab_size} ids; "
                                   f"allowed: a model with that vocabulary")
        self.check_computes(folder, hf)
        return hf

    def check_computes(self, folder: Path, hf: dict) -> None:
        """Refuse a config.json setting that the family does not compute."""

    def load(self, cfg: ModelConfig, model: nn.Module) -> list[str]:
        """Copy cfg.init_from's weights into `model` (ConfigError for a folder that does
        not fit); return notes for the log."""
        raise NotImplementedError

    def write(self, model: nn.Module, folder: Path, eot: int) -> list[str]:
        """config.json and model.safetensors (fp32) of `model` in folder; return their names."""
        raise NotImplementedError


def read_config(path: str, allowed: str) -> tuple[Path, dict]:
    """A folder with config.json and model.safetensors, and its config.json as a dict."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(KEY, f"{path}: no such folder; allowed: {allowed}")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (folder / name).is_file():
            raise ConfigError(KEY, f"{path}: has no {name}; allowed: {allowed}")
    try:
        hf = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(KEY, f"{folder / CONFIG_FILE}: not JSON ({exc}); allowed: {allowed}"
                          ) from None
    if not isinstance(hf, dict):
        raise ConfigError(KEY, f"{folder / CONFIG_FILE}: a JSON {type(hf).__name__}; allowed: "
                               f"{allowed}")
    return folder, hf


def whole(folder: Path, hf: dict, name: str, allowed: str, default: Any = None) -> int:
    """config.json's `name`, a whole number above 0 (its default where absent and one is
    given)."""
    value = hf.get(name, default)
    if value is None and name not in hf:
        raise ConfigError(KEY, f"{folder / CONFIG_FILE}: no {name!r}; allowed: {allowed}")
    if type(value) is not int or value < 1:
        raise ConfigError(KEY, f"{folder / CONFIG_FILE}: {name} {value!r}; allowed: {allowed}")
    return value


def save(tensors: dict, folder: Path, config: dict) -> list[str]:
    """model.safetensors and config.json as save_pretrained writes them."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return [CONFIG_FILE, MODEL_FILE]


def source(cfg: ModelConfig) -> dict:
    """meta.json's record of where a run's weights came from."""
    folder = Path(cfg.init_from).expanduser().resolve()
    return {"path": str(folder), "sha256": sha256(folder / MODEL_FILE)}
