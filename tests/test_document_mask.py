"""Document masking (data.document_mask, docs/data.md): a packed window's loss, masked, is
the sum of its documents' losses each computed alone (a document begins at each
end-of-document id), and not without the mask; positions restart per document; flex
attention's block mask equals SDPA's boolean mask; a run with the mask trains as 2
processes as in one, resumes bit for bit, sweeps, and is scored by trainrun-eval with the
mask; a family or data that cannot take it is one line naming the key."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_identical, cli, config, final_weights, make_corpus, model_config, tiny
from helpers import train as train_in_process
from test_accumulation import max_relative_difference
from test_distributed import only_run_dir, torchrun

from trainrun import checkpoint, resume
from trainrun.errors import ConfigError
from trainrun.models import MODELS, documents

VOCAB, EOT = 257, 256  # the byte tokenizer's
MASKING = sorted(f for f, cls in MODELS.items() if cls.masks_documents)
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
         "model.max_seq_len=64", "data.seq_len=32"]
VARIANTS = {"llama": ["model.n_kv_heads=2"]}  # grouped-query attention
# two windows: a document's end, two whole documents, another's start; one that begins at
# an end-of-document id and ends on one
WINDOWS = torch.tensor([
    [5, 6, 7, EOT, 8, 9, 10, 11, 12, EOT, 13, 14, EOT, 15, 16, 17, 18],
    [EOT, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, EOT],
])


def tiny_model(family: str, *more: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = model_config(f"model={MODELS[family].default_option}", *SMALL,
                       *VARIANTS.get(family, []), *more)
    return cfg.build(VOCAB).eval()


def loss_sum(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")


def one_by_one(model, window: torch.Tensor) -> torch.Tensor:
    """The summed loss of each document of a window (inputs window[:-1]) read alone, its
    first token the end-of-document id before it (or the window's first)."""
    x, y = window[:-1], window[1:]
    cuts = [0, *[i for i, t in enumerate(x.tolist()) if t == EOT and i > 0], len(x)]
    return sum(loss_sum(model, x[None, a:b], y[None, a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True))


@pytest.mark.parametrize("family", MASKING)
def test_a_masked_window_scores_as_its_documents_read_one_by_one(family):
    model = tiny_model(family)
    x, y = WINDOWS[:, :-1], WINDOWS[:, 1:]
    plain = loss_sum(model, x, y)
    reference = sum(one_by_one(model, w) for w in WINDOWS)
    model.mask_documents(EOT)
    masked = loss_sum(model, x, y)
    print(f"{family}: masked {masked.item():.6f}, one by one {reference.item():.6f}, "
          f"unmasked {plain.item():.6f}")
    assert masked.item() == pytest.approx(reference.item(), rel=1e-6)
    assert abs(plain.item() - reference.item()) > 1e-3
    # a window that is one document (as a prompt: the end-of-document id, then text) reads
    # the same masked or not, which is why generation over a KV cache needs no mask
    one = WINDOWS[1:, :-1]
    with torch.no_grad():
        masked_logits = model(one)
        model.mask_documents(None)
        assert torch.allclose(masked_logits, model(one), atol=1e-6)


def test_documents_begin_at_each_end_of_document_id_and_count_positions_from_0():
    found = documents.documents(WINDOWS, EOT)
    assert found.positions.tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 1, 2, 3, 4],
        [*range(16), 0],
    ]
    # token 5 of the first window (id 9) sees 3..5: its document [EOT 8 9]
    assert found.mask[0, 0, 5].nonzero().flatten().tolist() == [3, 4, 5]


@pytest.mark.skipif(documents.flex_attention is None, reason="torch without flex_attention")
@pytest.mark.parametrize("family", MASKING)
def test_flex_attentions_block_mask_gives_the_boolean_masks_logits(family, monkeypatch):
    """The CUDA path's mask_mod, run eagerly on the CPU (flex_attention unfused)."""
    model = tiny_model(family)
    model.mask_documents(EOT)
    with torch.no_grad():
        boolean = model(WINDOWS)
        monkeypatch.setattr(documents, "flex_available", lambda device, head_dim: True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex_attention called without torch.compile
            flex = model(WINDOWS)
    assert (flex - boolean).abs().max() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", MASKING)
def test_on_cuda_the_compiled_flex_attention_gives_the_cpus_loss_and_trains(family):
    wide = ["model.n_heads=2", *(["model.n_kv_heads=1"] if family == "llama" else [])]
    model = tiny_model(family, *wide)  # heads of 16: flex_attention's kernels take them
    model.mask_documents(EOT)
    x, y = WINDOWS[:, :-1], WINDOWS[:, 1:]
    on_cpu = loss_sum(model, x, y)
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    assert documents.flex_available(x.device, 16) == (documents.flex_attention is not None)
    if documents.flex_attention is not None:  # the block mask, not the boolean one, is used
        assert isinstance(model.eval().documents(x, None, 0.0, 16).mask, documents.BlockMask)
    assert loss_sum(model, x, y).item() == pytest.approx(on_cpu.item(), rel=1e-4)
    F.cross_entropy(model.train()(x).flatten(0, 1), y.flatten()).backward()  # flex's backward
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def test_cached_generation_of_a_masked_model_is_the_unmasked_ones():
    from trainrun.after.sample import generate, picker

    model = tiny_model("gpt")
    greedy = picker(0.0, 0, 1.0, VOCAB, torch.Generator())
    prompt = [EOT, 40, 41, 42]
    plain = list(generate(model, prompt, 8, greedy))
    model.mask_documents(EOT)
    assert list(generate(model, prompt, 8, greedy)) == plain


def test_families_and_data_that_cannot_mask_documents_are_refused():
    with pytest.raises(ConfigError) as refused:
        config("model=transformer_tiny", "data.document_mask=true")
    assert refused.value.key == "data.document_mask" and "seq2seq" in refused.value.message
    assert config("data.document_mask=true", "data.packing=false").data.document_mask  # a no-op


def test_document_mask_on_translation_data_is_one_line_and_writes_nothing(tmp_path):
    from helpers import make_pairs, pair_overrides

    pairs = make_pairs(tmp_path / "pairs", n=20)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = cli(*pair_overrides(pairs), "data.document_mask=true", cwd=cwd)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("trainrun: error: data.document_mask: ")
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_a_masked_run_sweeps_trains_on_2_processes_resumes_and_evaluates_masked(tmp_path):
    """One sweep of data.document_mask=true,false (job 0 masked, job 1 not); the masked run
    again on 2 processes of half the batch; job 0 resumed from its middle checkpoint;
    trainrun-eval's loss of job 0 on its validation set."""
    from trainrun.after.evaluate import score
    from trainrun.after.run import open_run

    corpus = make_corpus(tmp_path / "docs.txt", n_docs=60, seed=3)
    args = tiny(corpus, "model=llama_tiny", "model.n_kv_heads=1", "trainer.max_steps=6",
                "trainer.ckpt_every=3", "trainer.keep_last=5", "trainer.eval_every=3",
                "trainer.log_every=1", "optimizer=sgd", "optimizer.lr=0.5",
                "scheduler=constant")
    sweep = tmp_path / "sweep"
    proc = cli("-m", *args, "data.batch_size=8", "data.document_mask=true,false",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    masked, plain = final_weights(sweep / "0"), final_weights(sweep / "1")
    assert max_relative_difference(masked, plain) > 1e-4  # the mask changes training

    two = torchrun(*args, "data.batch_size=4", "data.document_mask=true", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert max_relative_difference(final_weights(only_run_dir(tmp_path)), masked) < 1e-5

    part = tmp_path / "part"
    shutil.copytree(sweep / "0", part)
    shutil.rmtree(part / "checkpoints/step-00000006")
    (part / "checkpoints/latest").write_text(checkpoint.step_name(3) + "\n")
    train_in_process(part, *args, "data.batch_size=8", "data.document_mask=true",
                     f"resume={part}")
    assert_identical(final_weights(part), masked)
    # nor may a resume turn the mask on or off, also for a run recorded before the key
    masking = config(*args, "data.batch_size=8", "data.document_mask=true")
    step = part / "checkpoints/step-00000003"
    meta = checkpoint.read_meta(sweep / "1/checkpoints/step-00000003")
    for saved in (meta, {**meta, "config": {**meta["config"], "data": {
            k: v for k, v in meta["config"]["data"].items() if k != "document_mask"}}}):
        with pytest.raises(ConfigError) as refused:
            resume.check_compatible(masking, saved, step)
        assert refused.value.key == "data.document_mask"

    run = open_run(str(sweep / "0"), [])
    assert run.model.eot == EOT
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    loss = score(run, "validation", 8, None, lambda line: None)["loss"]
    assert loss == metrics["val_loss"]  # bit for bit, as the run measured it
    # other data (a group switch drops the run's data keys) is read as the run was trained,
    # unless the command sets the key itself
    other = ["data=text", f"data.files={corpus}", "data.sample_by=line"]
    assert open_run(str(sweep / "0"), other, data=False).model.eot == EOT
    assert open_run(str(sweep / "0"), ["data.document_mask=false"]).model.eot is None
    assert open_run(str(sweep / "1"), [], data=False).model.eot is None


def test_an_unmasked_model_builds_no_mask(monkeypatch):
    """Masking off costs nothing: forward never computes the documents."""
    model = tiny_model("gpt")
    monkeypatch.setattr(documents, "documents", lambda *a, **k: pytest.fail("documents built"))
    with torch.no_grad():
        model(WINDOWS)
