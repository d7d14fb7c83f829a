"""The model family contract, checked for every family in MODELS: a family added without
one of these fails the suite. Each builds from every one of its YAML options and counts its
parameters as its module holds them; its forward gives (B, T, padded(V)) logits; cached
generation equals recomputation; its FLOPs per token equal torch's own count; a checkpoint
resumes bit for bit; 2 processes equal one with the double batch (families of task "lm":
translation's training is tests/test_translation.py's); FSDP2 shards its units;
and, where it has a Hugging Face format, transformers computes the same logits from an
export and trainrun from a folder that transformers saved."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    assert_identical,
    cli,
    config,
    final_weights,
    make_corpus,
    model_config,
    tiny,
    train,
)
from test_accumulation import max_relative_difference
from test_distributed import only_run_dir, torchrun
from test_distributed import overrides as ddp_overrides

from trainrun import checkpoint, distributed
from trainrun.builders import build_model
from trainrun.composition.init_from import init_from_shape, option_family
from trainrun.console import Console
from trainrun.models import MODELS, padded, parameter_kinds

VOCAB = 257  # the byte tokenizer's: 256 bytes and the end of document, padded to 320
FAMILIES = sorted(MODELS)
# the families trained through the CLI here; translation: tests/test_translation.py
LM_FAMILIES = sorted(f for f, cls in MODELS.items() if cls.task == "lm")
OPTIONS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
BY_FAMILY = {f: [o for o in OPTIONS if option_family(o, None) == f] for f in FAMILIES}
# model keys that shrink any family's option to a test's size
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
         "model.max_seq_len=64", "data.seq_len=32"]
LAYER_KEYS = ("n_layers", "n_encoder_layers", "n_decoder_layers")  # a family's stacks


def small(family: str) -> list[str]:
    """SMALL for the family: its own keys of layers, 2 each."""
    fields = MODELS[family].__dataclass_fields__
    layers = [f"model.{k}=2" for k in LAYER_KEYS if k in fields]
    return [o for o in SMALL if not o.startswith("model.n_layers=")] + layers


def layers(cfg) -> int:
    return sum(getattr(cfg, k) for k in LAYER_KEYS if hasattr(cfg, k))


def inputs(family: str, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The forward inputs of a family's task over target ids (B, T): (ids,) for "lm";
    for "translation" a source of T ids too, its lengths T, T - 1, ... (at least 1)."""
    if MODELS[family].task == "lm":
        return (ids,)
    B, T = ids.shape
    g = torch.Generator().manual_seed(B * T)
    src = torch.randint(0, VOCAB, (B, T), generator=g)
    return src, (T - torch.arange(B)).clamp(min=1), ids


def default(family: str, *more: str):
    return model_config(f"model={MODELS[family].default_option}", *more)


def test_every_option_is_of_a_registered_family_and_every_family_has_options():
    assert set(FAMILIES) >= {"gpt", "llama"}
    assert {o: option_family(o, None) for o in OPTIONS if option_family(o, None) not in MODELS} == {}
    for family, cls in MODELS.items():
        assert cls.family == family and cls.default_option in BY_FAMILY[family]
        fields = {f.name for f in cls.__dataclass_fields__.values()}
        assert set(cls.shape_keys) <= fields and {"d_model", "max_seq_len", "init_from"} <= fields


def independent_count(model: torch.nn.Module, vocab: int) -> int:
    """Every distinct parameter once, less the padding rows of each matrix with a row per id."""
    unique = {id(p): p for p in model.parameters()}.values()
    rows = padded(vocab)
    return sum(p.numel() - ((rows - vocab) * p.shape[1] if p.dim() == 2 and p.shape[0] == rows
                            else 0) for p in unique)


@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_builds_and_counts_its_parameters(option):
    cfg = model_config(f"model={option}")
    assert type(cfg) is MODELS[option_family(option, None)]
    with torch.device("meta"):  # the shapes without allocating the weights
        model = cfg.build(VOCAB)
    assert model.num_params() == cfg.num_params(VOCAB) == independent_count(model, VOCAB)
    units = model.shard_units()
    assert len(units) == layers(cfg) and all(u in set(model.modules()) for u in units)
    # the output layer, tied or not, is a row per id as the embedding: no decay, no Muon
    kinds = parameter_kinds(model)
    assert kinds[next(n for n, p in model.named_parameters() if p is model.head.weight)] == \
        "embedding"


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_gives_logits_over_the_padded_vocabulary(family):
    torch.manual_seed(0)
    model = default(family).build(VOCAB)
    logits = model(*inputs(family, torch.randint(0, VOCAB, (3, 17))))
    assert logits.shape == (3, 17, padded(VOCAB))
    assert (logits[..., VOCAB:] == torch.finfo(logits.dtype).min).all()
    assert logits[..., :VOCAB].isfinite().all()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_recomputing_every_position(family):
    from trainrun.after.sample import generate, picker

    torch.manual_seed(1)
    model = default(family, *small(family)).build(VOCAB).eval()
    if MODELS[family].task == "translation":
        return check_cached_translation(model)
    prompt = torch.randint(0, VOCAB, (10,)).tolist()
    greedy = picker(0.0, 0, 1.0, VOCAB, torch.Generator())
    cached = list(generate(model, prompt, 40, greedy))
    context = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            context.append(int(model(torch.tensor([context]))[0, -1, :VOCAB].argmax()))
    assert cached == context[len(prompt):]


def check_cached_translation(model: torch.nn.Module) -> None:
    """trainrun.decoding.greedy (encoder once, decoder over its cache) equals the argmax of
    a whole forward pass recomputed at each step."""
    from trainrun.decoding import greedy

    src, lengths, _ = inputs(model.cfg.family, torch.zeros(3, 12, dtype=torch.long))
    found = greedy(model, src, lengths, bos=0, eos=1, max_len=30)
    with torch.no_grad():
        for i, hypothesis in enumerate(found):
            ids = [0]
            for _ in range(30):
                logits = model(src[i:i + 1], lengths[i:i + 1], torch.tensor([ids]))
                ids.append(int(logits[0, -1, :VOCAB].argmax()))
                if ids[-1] == 1:
                    break
            assert hypothesis.tokens == [t for t in ids[1:] if t != 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_per_token_match_torchs_flop_counter(family):
    """torch counts every matrix product of a forward and backward pass (attention's too,
    through SDPA's math kernel); the family's formula adds what it leaves out (norms,
    biases): within 1 %, while forgetting attention or the backward is off by 4 % or more."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg, vocab, T = default(family), 256, 64  # 256 ids: no padding rows
    model = cfg.build(vocab)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs(family, torch.randint(0, vocab, (1, T)))).sum().backward()
    assert counter.get_total_flops() / T == pytest.approx(cfg.flops_per_token(vocab, T), rel=0.01)
    assert model.flops_per_token(T) == cfg.flops_per_token(vocab, T)


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("families") / "docs.txt", n_docs=60, seed=3)


@pytest.mark.parametrize("family", LM_FAMILIES)  # translation: tests/test_translation.py
def test_a_checkpoint_resumes_bit_identically(family, docs, tmp_path):
    # dropout on: the RNG restore matters; accumulation: the data position matters
    args = tiny(docs, f"model={MODELS[family].default_option}", *SMALL, "model.dropout=0.2",
                "trainer.max_steps=8", "trainer.ckpt_every=4", "trainer.keep_last=5",
                "trainer.eval_every=4", "trainer.grad_accum_steps=2")
    train(tmp_path / "full", *args)
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints/step-00000008")
    (part / "checkpoints/latest").write_text(checkpoint.step_name(4) + "\n")
    train(part, *args, f"resume={part}")
    assert_identical(final_weights(part), final_weights(tmp_path / "full"))


@pytest.mark.slow
@pytest.mark.parametrize("family", LM_FAMILIES)  # translation: tests/test_translation.py
def test_two_processes_train_as_one_with_twice_the_batch(family, docs, tmp_path):
    model = [f"model={MODELS[family].default_option}", *SMALL]
    one = cli(*ddp_overrides(docs, 8, 1, *model), "hydra.run.dir=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = torchrun(*ddp_overrides(docs, 4, 1, *model), cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    run = only_run_dir(tmp_path)
    assert max_relative_difference(final_weights(run), final_weights(tmp_path / "one")) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_fsdp_shards_the_familys_units(family):
    from torch.distributed.fsdp import FSDPModule

    model = default(family, *small(family)).build(VOCAB)
    world = distributed.init_single(torch.device("cpu"))
    try:
        replicas = distributed.Replicas(model, "fsdp", world, torch.device("cpu"))
        assert isinstance(replicas.module, FSDPModule)
        assert all(isinstance(unit, FSDPModule) for unit in model.shard_units())
        logits = replicas.module(*inputs(family, torch.randint(0, VOCAB, (2, 8))))
        assert logits.shape == (2, 8, padded(VOCAB))
    finally:
        distributed.close()


# -- Hugging Face: transformers' forward is the reference ----------------------------------

def hf_config(family: str):
    """A random model's config of the family's Hugging Face class, as a user's folder has it
    (a family with a format and no entry here fails)."""
    transformers = pytest.importorskip("transformers")
    made = {
        "gpt": lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64,
            activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "llama": lambda: transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False),
    }
    return made[family]()


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


VARIANTS = {"gpt": [[]], "llama": [[], ["model.tie_embeddings=false"], ["model.n_kv_heads=1"]]}


@pytest.mark.parametrize("family,variant", [(f, v) for f in FAMILIES
                                            for v in VARIANTS.get(f, [[]])])
def test_an_export_gives_transformers_the_same_logits(family, variant, tmp_path):
    adapter = MODELS[family].hf
    if adapter is None:
        pytest.skip(f"family {family} has no Hugging Face format")
    pytest.importorskip("transformers")
    torch.manual_seed(2)
    model = default(family, *variant).build(VOCAB).eval()
    assert sorted(adapter.write(model, tmp_path, eot=256)) == ["config.json", "model.safetensors"]
    ids = torch.randint(0, VOCAB, (2, 50))
    with torch.no_grad():
        ours = model(ids)[..., :VOCAB]
    assert (hf_logits(tmp_path, ids) - ours).abs().max() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_init_from_a_folder_transformers_saved_gives_its_logits(family, tmp_path):
    adapter = MODELS[family].hf
    if adapter is None:
        pytest.skip(f"family {family} has no Hugging Face format")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    theirs = transformers.AutoModelForCausalLM.from_config(hf_config(family)).eval()
    theirs.save_pretrained(tmp_path / "hf")
    overrides = init_from_shape([f"model.init_from={tmp_path / 'hf'}", "data.seq_len=32"])
    cfg = config(*overrides).model
    assert cfg.family == family
    model = build_model(cfg, VOCAB, torch.device("cpu"), Console(interactive=False)).eval()
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        assert (model(ids)[..., :VOCAB] - theirs(ids).logits).abs().max() < 1e-5
