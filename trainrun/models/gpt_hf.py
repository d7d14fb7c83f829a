"""The gpt family's Hugging Face format (transformers' GPT2LMHeadModel): config.json and
model.safetensors, written by `trainrun-export` and read by `model.init_from`.

The gpt family's model is GPT-2's architecture: pre-norm blocks, learned positions, biases on
every linear layer but the head, the head tied to the token embedding, LayerNorm with eps
1e-5, attention scaled by 1/sqrt(head size). Its GELU is the exact one (GPT-2's
`activation_function: gelu`, not OpenAI's tanh approximation `gelu_new`). The names:

    trainrun                   GPT-2 (under transformer.)
    tok_emb, pos_emb, ln_f     wte, wpe, ln_f
    blocks.i.ln_attn, ln_mlp   h.i.ln_1, ln_2
    blocks.i.attn.qkv, proj    h.i.attn.c_attn, c_proj   (Conv1D: weight stored transposed)
    blocks.i.mlp.fc, proj      h.i.mlp.c_fc, c_proj      (Conv1D)
    head (= tok_emb)           lm_head (= wte, not stored)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from trainrun.checkpoint import MODEL_FILE
from trainrun.errors import ConfigError
from trainrun.models import hf as formats
from trainrun.models.hf import CONFIG_FILE, KEY, Adapter

if TYPE_CHECKING:
    from trainrun.models.gpt import GPT, GPTConfig

TOP = {"tok_emb": "wte", "pos_emb": "wpe", "ln_f": "ln_f"}
BLOCK = {"ln_attn": "ln_1", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
         "ln_mlp": "ln_2", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
CONV1D = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # (in, out): nn.Linear's transposed
BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # older transformers' causal masks
GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # "gelu" is the exact one
# model.<key> <- config.json's key; n_inner null means 4 x n_embd, as in transformers
SHAPE = {"d_model": "n_embd", "n_layers": "n_layer", "n_heads": "n_head", "d_ff": "n_inner",
         "max_seq_len": "n_positions"}
ALLOWED = "a Hugging Face GPT-2 folder (config.json, model.safetensors), such as trainrun-export writes"


def gpt2_name(name: str) -> str | None:
    """GPT-2's name (without "transformer.") of a trainrun parameter; None for the tied head."""
    if name == "head.weight":
        return None
    block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", name)
    if block:
        return f"h.{block[1]}.{BLOCK[block[2]]}.{block[3]}"
    module, kind = name.rsplit(".", 1)
    return f"{TOP[module]}.{kind}"


def config(model: GPT, eot: int) -> dict:
    """config.json of the GPT2LMHeadModel that computes what `model` computes."""
    c = model.cfg
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": model.vocab_size,  # the padding rows left out
        "n_positions": c.max_seq_len, "n_embd": c.d_model, "n_layer": c.n_layers,
        "n_head": c.n_heads, "n_inner": c.d_ff, "activation_function": "gelu",
        "layer_norm_epsilon": model.ln_f.eps, "resid_pdrop": c.dropout, "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout, "initializer_range": 0.02, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "bos_token_id": eot,
        "eos_token_id": eot, "dtype": "float32",
    }


def write(model: GPT, folder: Path, eot: int) -> list[str]:
    """config.json and model.safetensors (fp32) of `model` in folder; return their names."""
    tensors = {}
    for name, value in model.state_dict().items():
        hf = gpt2_name(name)
        if hf is not None:
            value = value.detach().float().cpu()
            if hf == "wte.weight":
                value = value[:model.vocab_size]
            tensors[f"transformer.{hf}"] = (value.t() if hf.endswith(CONV1D) else value).contiguous()
    return formats.save(tensors, folder, config(model, eot))


class GPT2(Adapter):
    model_type, architecture, shape_names = "gpt2", "GPT2LMHeadModel", SHAPE

    def shape(self, folder: Path, hf: dict) -> dict[str, int]:
        """The model.* shape keys that config.json gives; n_inner null is 4 x n_embd."""
        found = {}
        for key, name in SHAPE.items():
            if name == "n_inner" and hf.get(name) is None:
                found[key] = 4 * found["d_model"]  # n_embd comes first
            else:
                found[key] = formats.whole(folder, hf, name, ALLOWED)
        return found

    def name_of(self, key: str, hf: dict) -> str:
        return SHAPE[key] if key != "d_ff" or hf.get("n_inner") else "n_inner (4 x n_embd)"

    def check_computes(self, folder: Path, hf: dict) -> None:
        differs = [(k, hf.get(k, default), allowed) for k, default, allowed in (
            ("activation_function", "gelu_new", GELUS), ("layer_norm_epsilon", 1e-5, (1e-5,)),
            ("scale_attn_by_inverse_layer_idx", False, (False,)),
            ("tie_word_embeddings", True, (True,)))
            if hf.get(k, default) not in allowed]
        if differs:
            k, value, allowed = differs[0]
            raise ConfigError(KEY, f"{folder}: {k} {value!r} ({CONFIG_FILE}); trainrun's model "
                                   f"computes {', '.join(map(repr, allowed))}")

    def load(self, cfg: GPTConfig, model: GPT) -> list[str]:
        """Copy model.init_from's weights into `model`; notes for the log (an approximate
        GELU that trainrun computes exactly)."""
        from safetensors import safe_open

        hf = self.check(cfg, model.vocab_size)
        path = Path(cfg.init_from).expanduser() / MODEL_FILE
        with safe_open(str(path), framework="pt") as f:
            stored = {re.sub(r"^transformer\.", "", k): k for k in f.keys()}
            state = {}
            for name, param in model.state_dict().items():
                hf_name = gpt2_name(name) or "wte.weight"
                if hf_name not in stored:
                    raise ConfigError(KEY, f"{path}: no tensor {hf_name}; allowed: {ALLOWED}")
                value = f.get_tensor(stored[hf_name])
                conv1d = hf_name.endswith(CONV1D)
                if hf_name == "wte.weight":  # the padding rows keep their values
                    param = param[:model.vocab_size]
                expected = tuple(param.shape[::-1] if conv1d else param.shape)
                if tuple(value.shape) != expected:
                    raise ConfigError(KEY, f"{path}: {hf_name} has shape {tuple(value.shape)}; "
                                           f"{CONFIG_FILE} gives {expected}")
                state[name] = value.t() if conv1d else value
                if hf_name == "wte.weight":
                    state[name] = torch.cat([value, model.state_dict()[name][model.vocab_size:]])
            extra = [k for k in stored if k != "lm_head.weight" and not BUFFERS.fullmatch(k)
                     and k not in {gpt2_name(n) for n in state}]
        if extra:
            raise ConfigError(KEY, f"{path}: unexpected tensor {extra[0]}; allowed: {ALLOWED}")
        with torch.no_grad():
            model.load_state_dict(state)
        act = hf.get("activation_function", "gelu_new")
        return [] if act == "gelu" else [
            f"{KEY}: the folder's activation_function is {act!r}, an approximation of the exact "
            f"GELU that trainrun computes; outputs differ slightly until fine-tuning adapts"]

    def write(self, model: GPT, folder: Path, eot: int) -> list[str]:
        return write(model, folder, eot)


ADAPTER = GPT2()
