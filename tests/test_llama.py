"""The llama family end to end: every optimizer and precision with accumulation and
clipping, compile, SIGTERM and resume, a sweep across families, sample and eval, the
Hugging Face round trips through the commands, and bad input."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
import torch
from helpers import assert_identical, cli, final_weights, tiny, train, wait_for
from test_accumulation import max_relative_difference
from test_resume import overrides as resume_overrides
from test_resume import start

from trainrun.models import llama_hf
from trainrun.optimizers import OPTIMIZERS

LLAMA = ["model=llama_tiny", "model.n_heads=4"]  # with tiny()'s d_model 32: 4 query heads, 2 KV
VOCAB = 257


def short(corpus: Path, *more: str) -> list[str]:
    return tiny(corpus, *LLAMA, "trainer.max_steps=4", "trainer.eval_every=4",
                "trainer.grad_accum_steps=2", "clip.max_norm=0.5", *more)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_trains_llama(corpus, tmp_path, optimizer):
    m = train(tmp_path / "run", *short(corpus, f"optimizer={optimizer}"))
    assert m["status"] == "completed" and m["steps"] == 4 and math.isfinite(m["val_loss"])
    assert m["parameters"] == json.loads((tmp_path / "run/metrics.json").read_text())["parameters"]


def test_muon_steps_the_blocks_matrices_and_adamw_the_rest(corpus):
    from helpers import config

    from trainrun.optimizers import build_optimizer

    cfg = config(*short(corpus, "optimizer=muon", "model.tie_embeddings=false"))
    model = cfg.model.build(VOCAB)
    optimizer = build_optimizer(cfg.optimizer, model, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    assert muon == {n for n, p in model.named_parameters()
                    if n.startswith("layers.") and n.endswith("_proj.weight")}
    assert {"embed.weight", "head.weight", "norm.weight"} <= {
        names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_llama_trains_under_autocast(corpus, tmp_path, precision):
    m = train(tmp_path / "run", *short(corpus, f"precision={precision}"))
    assert m["status"] == "completed" and math.isfinite(m["val_loss"])


@pytest.mark.slow
def test_compiled_llama_trains_as_the_eager_one(corpus, tmp_path):
    eager = train(tmp_path / "eager", *short(corpus))
    compiled = train(tmp_path / "compiled", *short(corpus, "trainer.compile=true"))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)
    assert max_relative_difference(final_weights(tmp_path / "compiled"),
                                   final_weights(tmp_path / "eager")) < 1e-4


@pytest.mark.slow
def test_sigterm_then_resume_ends_where_the_uninterrupted_run_ends(corpus, tmp_path):
    full = cli(*resume_overrides(corpus, tmp_path / "full", *LLAMA), cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    run = tmp_path / "term"
    proc = start(resume_overrides(corpus, run, *LLAMA), tmp_path)
    wait_for(lambda: (run / "train.log").exists() and "step 6/" in (run / "train.log").read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    resumed = cli(f"resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(final_weights(run), final_weights(tmp_path / "full"))

    # the run keeps its family: another is refused in one line naming both
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    refused = cli(f"resume={run}", "model=gpt_tiny", "trainer.max_steps=30", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "family llama" in refused.stderr and "family gpt" in refused.stderr
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


@pytest.mark.slow
def test_a_sweep_across_families_reports_both_with_their_parameters(corpus, tmp_path):
    proc = cli("-m", "model=gpt_tiny,llama_tiny", *tiny(corpus, "trainer.max_steps=3",
                                                         "trainer.eval_every=3"),
               "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "sweep/summary.csv").open()))
    assert sorted(r["overrides"].split()[0] for r in rows) == ["model=gpt_tiny",
                                                                "model=llama_tiny"]
    for row in rows:
        assert row["status"] == "completed" and float(row["val_loss"]) > 0
        metrics = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert int(row["parameters"]) == metrics["parameters"] > 0
    assert len({r["parameters"] for r in rows}) == 2


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, corpus) -> Path:
    cwd = tmp_path_factory.mktemp("llama")
    proc = cli(*tiny(corpus, *LLAMA, "model.tie_embeddings=false", "trainer.max_steps=6",
                     "trainer.eval_every=3"), "hydra.run.dir=run", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "run"


def test_sample_and_eval_read_a_llama_run(llama_run, capsys):
    from trainrun.commands import eval as evaluate
    from trainrun.commands import sample

    sample.main([str(llama_run), "the ", "--max-new-tokens", "8", "--temperature", "0"])
    assert capsys.readouterr().out.startswith("the ")
    evaluate.main([str(llama_run), "--json"])
    figures = json.loads(capsys.readouterr().out)
    assert math.isfinite(figures["loss"]) and figures["sequences"] > 0


def test_export_loads_in_transformers_with_the_runs_logits(llama_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from trainrun.after.run import open_run
    from trainrun.commands import export

    export.main([str(llama_run), str(tmp_path / "out")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and not hf.config.tie_word_embeddings
    assert hf.config.num_key_value_heads == 2 and hf.config.num_attention_heads == 4
    ours = open_run(str(llama_run), [], data=False).model
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)[..., :VOCAB]).abs().max() < 1e-5
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer("hi")["input_ids"][-2:] == [ord("h"), ord("i")]


def data_args(corpus: Path) -> list[str]:
    """tiny()'s run without its model keys."""
    return ["data=text", f"data.files={corpus}", "data.sample_by=line", "data.seq_len=32",
            "data.batch_size=4", "trainer.max_steps=2", "trainer.eval_sequences=8",
            "trainer.device=cpu", "precision=fp32"]


def hf_llama(folder: Path, **changes) -> Path:
    """A random LlamaForCausalLM saved by transformers (untied, grouped-query attention)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False)
    config = transformers.LlamaConfig(**{**shape, **changes})
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_init_from_a_llama_folder_takes_its_family_shape_and_weights(corpus, tmp_path):
    """No model= given: the folder's family (llama_tiny) and shape are taken, and the run
    starts from its weights (an lr of 1e-30 leaves them as they were, bit for bit)."""
    from safetensors.torch import load_file

    folder = hf_llama(tmp_path / "hf")
    run = tmp_path / "run"
    proc = cli(f"model.init_from={folder}", *data_args(corpus), "optimizer=sgd",
               "optimizer.lr=1e-30", "trainer.max_steps=1", "trainer.eval_every=1", f"hydra.run.dir={run}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (f"weights from model.init_from={folder}, a model of d_model 64, n_layers 2, "
            f"n_heads 4, n_kv_heads 2, d_ff 96, max_seq_len 64, tie_embeddings False") in proc.stdout
    assert "model=llama_tiny" in (run / ".hydra/overrides.yaml").read_text()
    theirs, trained = load_file(folder / "model.safetensors"), final_weights(run)
    assert len(theirs) == len(trained)
    for name, value in trained.items():
        assert torch.equal(value[:VOCAB], theirs[llama_hf.hf_name(name)]), name


@pytest.mark.parametrize("args, key, words", [
    (["model=gpt_tiny", "model.n_kv_heads=2"], "model.n_kv_heads", "unknown key"),
    (["model=llama_tiny", "model.n_kv_heads=3"], "model.n_kv_heads", "does not divide"),
    (["model=llama_tiny", "model.d_model=96", "model.n_heads=32"], "model.n_heads", "even"),
    (["model=llama_huge"], "model", "llama_tiny"),
    (["model=llama_tiny", "model.init_from=FOLDER", "model.n_layers=3"], "model.n_layers",
     "num_hidden_layers 2"),
    (["model=gpt_small", "model.init_from=FOLDER"], "model.init_from", "family llama"),
    (["model.init_from=BERT"], "model.init_from", "model_type 'bert'"),
])
def test_bad_llama_input_is_one_line_and_writes_nothing(corpus, tmp_path, args, key, words):
    folder = hf_llama(tmp_path / "hf") if "model.init_from=FOLDER" in args else None
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "bert/model.safetensors").write_bytes(b"")
    args = [a.replace("FOLDER", str(folder)).replace("BERT", str(tmp_path / "bert"))
            for a in args]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = cli(*data_args(corpus), *args, cwd=cwd)  # the options' own shapes
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"trainrun: error: {key}: ") and words in proc.stderr
    assert list(cwd.iterdir()) == []


def test_smollm_135m_counts_as_transformers_counts_smollm(tmp_path):
    """The option's shape with SmolLM's 49,152-id vocabulary: the parameters of the
    LlamaForCausalLM that transformers builds from SmolLM-135M's config (134,515,008)."""
    from helpers import config

    transformers = pytest.importorskip("transformers")
    cfg = config("model=smollm_135m").model
    smollm = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
    with torch.device("meta"):
        theirs = transformers.LlamaForCausalLM(smollm)
        ours = cfg.build(49152)
    assert cfg.num_params(49152) == ours.num_params() == sum(
        p.numel() for p in theirs.parameters()) == 134_515_008
