"""The llama family's Hugging Face format (transformers' LlamaForCausalLM): config.json and
model.safetensors, written by `trainrun-export` and read by `model.init_from`.

The names (all under model. but the head):

    trainrun                      LlamaForCausalLM
    embed, norm                   model.embed_tokens, model.norm
    layers.i.attn_norm, mlp_norm  model.layers.i.input_layernorm, post_attention_layernorm
    layers.i.attn.{q,k,v,o}_proj  model.layers.i.self_attn.{q,k,v,o}_proj
    layers.i.mlp.{gate,up,down}_proj  model.layers.i.mlp.{gate,up,down}_proj
    head                          lm_head (not stored when tied)

No tensor is transposed or permuted: trainrun's rotary layout is transformers' own.
LlamaForCausalLM has no QK-norm, so a model with model.qk_norm=true has no such folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainrun.checkpoint import MODEL_FILE
from trainrun.errors import ConfigError
from trainrun.models import hf as formats
from trainrun.models.hf import CONFIG_FILE, KEY, Adapter

if TYPE_CHECKING:
    from trainrun.models.llama import Llama, LlamaConfig

TOP = {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head"}
LAYER = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
         **{f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
         **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}}
ROWS = ("model.embed_tokens.weight", "lm_head.weight")  # a row per id: padding rows on our side
BUFFERS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # older files
# model.<key> <- config.json's key
SHAPE = {"d_model": "hidden_size", "n_layers": "num_hidden_layers",
         "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
         "d_ff": "intermediate_size", "max_seq_len": "max_position_embeddings",
         "tie_embeddings": "tie_word_embeddings", "rope_theta": "rope_theta",
         "norm_eps": "rms_norm_eps"}


def hf_name(name: str) -> str:
    """LlamaForCausalLM's name of a trainrun parameter."""
    layer = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", name)
    if layer:
        return f"model.layers.{layer[1]}.{LAYER[layer[2]]}.weight"
    module, kind = name.rsplit(".", 1)
    return f"{TOP[module]}.{kind}"


def rope_theta(hf: dict) -> Any:
    """The rotary base: transformers 5's rope_parameters, or an older folder's rope_theta."""
    parameters = hf.get("rope_parameters")
    if isinstance(parameters, dict) and "rope_theta" in parameters:
        return parameters["rope_theta"]
    return hf.get("rope_theta", 10000.0)


class LlamaFormat(Adapter):
    model_type, architecture, shape_names = "llama", "LlamaForCausalLM", SHAPE

    def shape(self, folder: Path, hf: dict) -> dict[str, Any]:
        whole = {k: formats.whole(folder, hf, name, self.allowed,
                                  hf.get("num_attention_heads") if k == "n_kv_heads" else None)
                 for k, name in SHAPE.items()
                 if k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len")}
        tied = hf.get("tie_word_embeddings", False)  # LlamaConfig's default
        theta, eps = rope_theta(hf), hf.get("rms_norm_eps", 1e-6)
        for name, value, kind in (("tie_word_embeddings", tied, bool),
                                  ("rope_theta", theta, (int, float)),
                                  ("rms_norm_eps", eps, (int, float))):
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise ConfigError(KEY, f"{folder / CONFIG_FILE}: {name} {value!r}; allowed: "
                                       f"{self.allowed}")
        return {**whole, "tie_embeddings": tied, "rope_theta": float(theta),
                "norm_eps": float(eps)}

    def check(self, cfg: LlamaConfig, vocab_size: int) -> dict:
        if cfg.qk_norm:
            raise ConfigError(KEY, f"{cfg.init_from} with model.qk_norm=true; "
                                   f"{self.architecture} has no QK-norm; allowed: "
                                   f"model.qk_norm=false")
        return super().check(_resolved(cfg), vocab_size)

    def check_computes(self, folder: Path, hf: dict) -> None:
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        differs = [(k, value, allowed) for k, value, allowed in (
            ("hidden_act", hf.get("hidden_act", "silu"), ("silu",)),
            ("attention_bias", hf.get("attention_bias", False), (False,)),
            ("mlp_bias", hf.get("mlp_bias", False), (False,)),
            ("pretraining_tp", hf.get("pretraining_tp", 1), (1,)),
            ("head_dim", hf.get("head_dim") or head_dim, (head_dim,)),
            ("rope_scaling", hf.get("rope_scaling"), (None,)),
            ("rope_parameters.rope_type", rope.get("rope_type", "default"), ("default",)))
            if value not in allowed]
        if differs:
            k, value, allowed = differs[0]
            raise ConfigError(KEY, f"{folder}: {k} {value!r} ({CONFIG_FILE}); trainrun's llama "
                                   f"computes {', '.join(map(repr, allowed))}")

    def load(self, cfg: LlamaConfig, model: Llama) -> list[str]:
        """Copy model.init_from's weights into `model` (the padding rows keep theirs)."""
        from safetensors import safe_open

        self.check(cfg, model.vocab_size)
        path = Path(cfg.init_from).expanduser() / MODEL_FILE
        own = model.state_dict()
        with safe_open(str(path), framework="pt") as f:
            stored = set(f.keys())
            state = {}
            for name, param in own.items():
                theirs = hf_name(name)
                if theirs == "lm_head.weight" and cfg.tie_embeddings:
                    continue  # the embedding, loaded under its own name
                if theirs not in stored:
                    raise ConfigError(KEY, f"{path}: no tensor {theirs}; allowed: {self.allowed}")
                value = f.get_tensor(theirs)
                rows = theirs in ROWS
                expected = (model.vocab_size, *param.shape[1:]) if rows else tuple(param.shape)
                if tuple(value.shape) != tuple(expected):
                    raise ConfigError(KEY, f"{path}: {theirs} has shape {tuple(value.shape)}; "
                                           f"{CONFIG_FILE} gives {tuple(expected)}")
                state[name] = torch.cat([value, param[model.vocab_size:]]) if rows else value
            read = {hf_name(n) for n in state} | ({"lm_head.weight"} if cfg.tie_embeddings else set())
            extra = sorted(k for k in stored if k not in read and not BUFFERS.fullmatch(k))
        if extra:
            raise ConfigError(KEY, f"{path}: unexpected tensor {extra[0]}; allowed: {self.allowed}")
        with torch.no_grad():
            model.load_state_dict(state, strict=not cfg.tie_embeddings)
        return []

    def write(self, model: Llama, folder: Path, eot: int) -> list[str]:
        cfg = model.cfg
        if cfg.qk_norm:
            raise ConfigError("model.qk_norm", f"true: {self.architecture} has no QK-norm, so "
                                               f"this model has no Hugging Face folder; allowed: "
                                               f"a model trained with model.qk_norm=false")
        tensors = {}
        for name, value in model.state_dict().items():
            theirs = hf_name(name)
            if theirs == "lm_head.weight" and cfg.tie_embeddings:
                continue  # transformers ties it to the embedding
            value = value.detach().float().cpu()
            tensors[theirs] = (value[:model.vocab_size] if theirs in ROWS else value).contiguous()
        return formats.save(tensors, folder, config(model, eot))


def config(model: Llama, eot: int) -> dict:
    """config.json of the LlamaForCausalLM that computes what `model` computes."""
    c = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": model.vocab_size,  # the padding rows left out
        "hidden_size": c.d_model, "intermediate_size": c.hidden,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,  # transformers 4's name; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": c.dropout,
        "pretraining_tp": 1, "initializer_range": 0.02,
        "tie_word_embeddings": c.tie_embeddings, "use_cache": True, "bos_token_id": eot,
        "eos_token_id": eot, "dtype": "float32",
    }


def _resolved(cfg: LlamaConfig) -> LlamaConfig:
    """cfg with d_ff and n_kv_heads as numbers (null: their derived values), to compare with
    a folder's."""
    return cfg.replace(d_ff=cfg.hidden, n_kv_heads=cfg.kv_heads)


ADAPTER = LlamaFormat()
