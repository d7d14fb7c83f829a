"""Model families: `model=<option>` picks a YAML option (conf/model/<option>.yaml) whose
schema is one family's config (`schemas/model/<family>`). This package's interface: the
registry MODELS (family -> its config), ModelConfig (what every family provides: see
base.py), family_of, adapter_for, and the helpers every family shares.

    base.py       ModelConfig, the module interface, KVCache, padding, parameter kinds
    hf.py         Adapter: a family's Hugging Face format (export, model.init_from)
    documents.py  document masking (data.document_mask): the documents of a packed window,
                  their positions and attention mask, for the decoders that mix it in
    gpt.py        gpt: GPT-2's decoder (gpt_tiny, gpt_small, gpt2_124m)
    gpt_hf.py     its format, GPT2LMHeadModel
    llama.py      llama: RMSNorm, rotary positions, SwiGLU, grouped-query attention
                  (llama_tiny, llama_small, smollm_135m)
    seq2seq.py    seq2seq: the encoder-decoder Transformer of "Attention Is All You Need",
                  task "translation" (transformer_tiny, transformer_small, transformer_base)
    llama_hf.py   its format, LlamaForCausalLM

Adding a family: its module and adapter here, one line in MODELS, its YAML options in
conf/model/ (docs/models.md says how; tests/test_model_families.py checks the contract).
"""

from __future__ import annotations

from trainrun.errors import ConfigError
from trainrun.models.base import KINDS, KVCache, ModelConfig, padded, parameter_kinds
from trainrun.models.gpt import GPT, GPTConfig
from trainrun.models.hf import Adapter
from trainrun.models.llama import Llama, LlamaConfig
from trainrun.models.seq2seq import Memory, Seq2Seq, Seq2SeqCache, Seq2SeqConfig

__all__ = ["GPT", "KINDS", "MODELS", "Adapter", "GPTConfig", "KVCache", "Llama", "LlamaConfig",
           "Memory", "ModelConfig", "Seq2Seq", "Seq2SeqCache", "Seq2SeqConfig", "adapter_for",
           "family_of", "padded", "parameter_kinds"]

MODELS: dict[str, type[ModelConfig]] = {
    "gpt": GPTConfig,
    "llama": LlamaConfig,
    "seq2seq": Seq2SeqConfig,
}


def family_of(schema_name: str) -> str:
    """The family whose config class is named schema_name (meta.json's record); runs
    recorded before families were named by their schema ModelConfig, GPT's."""
    names = {cls.__name__: family for family, cls in MODELS.items()}
    return names.get(schema_name, "gpt" if schema_name == "ModelConfig" else schema_name)


def adapter_for(model_type: object) -> tuple[str, Adapter] | None:
    """The family whose Hugging Face format has this config.json model_type, and its adapter."""
    for family, cls in MODELS.items():
        if cls.hf is not None and cls.hf.model_type == model_type:
            return family, cls.hf
    return None


def formats() -> str:
    """The Hugging Face classes model.init_from reads, for messages."""
    return ", ".join(cls.hf.architecture for cls in MODELS.values() if cls.hf is not None)


def require_family(key: str, family: str) -> type[ModelConfig]:
    if family not in MODELS:
        raise ConfigError(key, f"unknown model family {family!r}; allowed: {', '.join(MODELS)}")
    return MODELS[family]
