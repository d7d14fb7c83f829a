"""trainrun-export and model.init_from: transformers loads an export as GPT-2 with the same
logits and token ids (these tests skip without the `hf` extra); an export read back through
model.init_from gives the same logits; a run started from one trains and records it; folders
that do not fit are one line and exit status 2."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import cli, config, final_weights, tiny, train

from trainrun import builders, checkpoint
from trainrun.after.run import open_run
from trainrun.commands import export
from trainrun.console import Console
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.errors import ConfigError
from trainrun.models import GPT
from trainrun.models import gpt_hf as gpt2

VOCAB = ByteTokenizer.vocab_size
TEXTS = ["the model learns", " two  spaces\tand a tab\n", "héllo wörld — 日本語 🎉",
         "a literal <|endoftext|> is text", ""]


@pytest.fixture(scope="module", params=["byte", "bpe"])
def run_and_export(request, finished_run, bpe_run, tmp_path_factory) -> tuple[Path, Path]:
    run = finished_run if request.param == "byte" else bpe_run
    out = tmp_path_factory.mktemp("export") / "hf"
    export.main([str(run), str(out)])
    return run, out


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "hf"
    export.main([str(finished_run), str(out)])
    return out


def test_transformers_loads_the_export_as_gpt2_with_the_same_logits(run_and_export):
    transformers = pytest.importorskip("transformers")
    run_dir, exported = run_and_export
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.dtype == torch.float32
    run = open_run(str(run_dir), [], data=False)
    model, tok = run.model, run.tokenizer
    assert hf.config.vocab_size == tok.vocab_size  # the embedding's padding rows left out
    x = torch.randint(0, tok.vocab_size, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(x).logits - model(x)[..., :tok.vocab_size]).abs().max().item()
    assert diff < 1e-4
    # GPT-2's own generation, with its own cache, continues as trainrun-sample's greedy does
    from trainrun.after.sample import generate, picker

    prompt = [tok.eot, *tok.encode("the ")]
    ours = list(generate(model, prompt, 20, picker(0.0, 0, 1.0, tok.vocab_size, None)))
    hf.generation_config.eos_token_id = None  # trainrun's generate() does not stop either
    theirs = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         max_new_tokens=20, do_sample=False,
                         pad_token_id=tok.eot)[0, len(prompt):].tolist()
    assert theirs == ours


def test_autotokenizer_gives_the_runs_token_ids(run_and_export):
    transformers = pytest.importorskip("transformers")
    run_dir, exported = run_and_export
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    ours = open_run(str(run_dir), [], data=False).tokenizer
    for text in TEXTS:
        # the reference: UTF-8 bytes for the byte tokenizer; for bpe, the ids of the token
        # file's documents are checked in test_tokenizers.py
        expected = list(text.encode("utf-8")) if ours.eot == 256 else ours.encode(text)
        assert ours.encode(text) == expected
        assert tok(text)["input_ids"] == expected, text
        assert tok.decode(expected) == text
    assert tok.eos_token_id == tok.bos_token_id == ours.eot
    assert tok.decode([ours.eot]) == "<|endoftext|>"


def test_the_export_read_back_by_init_from_gives_the_same_logits(finished_run, exported,
                                                                 corpus):
    cfg = config(*tiny(corpus, f"model.init_from={exported}"))
    started = builders.build_model(cfg.model, VOCAB, torch.device("cpu"), Console(interactive=False))
    model = open_run(str(finished_run), [], data=False).model
    x = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(started.eval()(x), model(x))


def test_a_run_from_init_from_trains_and_records_its_source(exported, corpus, tmp_path):
    source = tmp_path / "pretrained"
    shutil.copytree(exported, source)
    overrides = tiny(corpus, f"model.init_from={source}", "trainer.eval_every=2",
                     "trainer.log_every=1")
    metrics = train(tmp_path / "run", *overrides, "trainer.max_steps=4")
    assert metrics["status"] == "completed" and metrics["steps"] == 4
    record = {"path": str(source.resolve()), "sha256": checkpoint.sha256(source / "model.safetensors")}
    meta = json.loads((tmp_path / "run/checkpoints/step-00000004/meta.json").read_text())
    assert meta["init_from"] == record
    # resumed, it needs its checkpoint only, and keeps the record
    shutil.rmtree(source)
    train(tmp_path / "run", *overrides, "trainer.max_steps=6", f"resume={tmp_path / 'run'}")
    meta = json.loads((tmp_path / "run/checkpoints/step-00000006/meta.json").read_text())
    assert meta["init_from"] == record
    fresh = train(tmp_path / "fresh", *tiny(corpus, "trainer.max_steps=4",
                                             "trainer.eval_every=2", "trainer.log_every=1"))
    # the pretrained start is far below a fresh model's ln(257) = 5.55 and stays there
    assert metrics["val_loss"] < fresh["val_loss"] - 1 < math.log(257) - 1


def write_gpt2(folder: Path, corpus: Path, **changes) -> Path:
    """A GPT-2 folder of TINY's shape (its weights from a fresh model), config.json changed."""
    from trainrun.models import GPT

    folder.mkdir()
    cfg = config(*tiny(corpus)).model
    gpt2.write(GPT(cfg, VOCAB), folder, ByteTokenizer.eot)
    hf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf, **changes}))
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"n_embd": 64}, "the folder's shape, model.d_model=64 model.n_layers=2"),
    ({"n_inner": None}, "model.d_ff=128"),
    ({"n_positions": 1024}, "model.max_seq_len=1024"),
    ({"vocab_size": 50257}, "vocab_size 50257"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings False"),
])
def test_a_folder_that_does_not_fit_the_chosen_model_is_refused(tmp_path, corpus, changes,
                                                                 message):
    folder = write_gpt2(tmp_path / "hf", corpus, **changes)
    with pytest.raises(ConfigError) as error:
        config(*tiny(corpus, f"model.init_from={folder}"))
    assert error.value.key == "model.init_from" and message in error.value.message


def test_weights_that_do_not_match_their_config_are_refused(tmp_path, corpus):
    from safetensors.torch import load_file, save_file

    folder = write_gpt2(tmp_path / "hf", corpus)
    tensors = load_file(folder / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(32, 63)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = config(*tiny(corpus, f"model.init_from={folder}"))
    with pytest.raises(ConfigError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(32, 63\)"):
        builders.build_model(cfg.model, VOCAB, torch.device("cpu"), Console(interactive=False))


def test_a_bad_init_from_is_one_line_in_a_process_and_writes_nothing(exported, corpus,
                                                                     tmp_path):
    for overrides, key in ((["model.d_model=64", f"model.init_from={exported}"], "model.d_model"),
                           ([f"model.init_from={tmp_path / 'none'}"], "model.init_from")):
        proc = cli(*tiny(corpus, *overrides), cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1
        assert proc.stderr.startswith(f"trainrun: error: {key}: ")
    assert list(tmp_path.iterdir()) == []  # not even Hydra's outputs/<date>/<time>/


# -- model.init_from takes the folder's shape; the export's command starts a run ----------

SHORT = ["data=text", "data.sample_by=line", "data.seq_len=32", "data.batch_size=4",
         "trainer.max_steps=2", "trainer.eval_every=1", "trainer.eval_batches=2",
         "trainer.device=cpu", "precision=fp32"]  # TINY's run, without its model keys


def as_trainrun(export_dir: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of an export's model.safetensors, by trainrun's names, in its layout:
    what `model` holds where it started from them (the embedding's padding rows left out)."""
    from safetensors.torch import load_file

    stored = load_file(export_dir / "model.safetensors")
    out = {}
    for name in model.state_dict():
        hf = gpt2.gpt2_name(name)
        if hf is not None:
            value = stored[f"transformer.{hf}"]
            out[name] = value.t() if hf.endswith(gpt2.CONV1D) else value
    return out


def test_init_from_alone_takes_the_shape_and_the_weights_of_the_folder(exported, corpus,
                                                                      tmp_path):
    """No model key given: the shape comes from config.json (TINY's, not gpt_tiny's), and
    the run starts from the folder's weights (an lr of 1e-30 leaves them as they were, bit
    for bit, where a fresh initialization would differ everywhere)."""
    run = tmp_path / "run"
    proc = cli(f"model.init_from={exported}", *SHORT, f"data.files={corpus}", "optimizer=sgd",
               "optimizer.lr=1e-30", "trainer.max_steps=1", f"hydra.run.dir={run}",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (f"weights from model.init_from={exported}, a model of d_model 32, n_layers 2, "
            f"n_heads 2, d_ff 64, max_seq_len 64") in proc.stdout
    trained = final_weights(run)
    started = as_trainrun(exported, GPT(config(*tiny(corpus)).model, VOCAB))
    for name, value in started.items():
        if name == "tok_emb.weight":  # saved once, as the head tied to it
            mine = trained["head.weight"][:VOCAB]
        else:
            mine = trained[name]
        assert torch.equal(mine, value), name


def test_an_explicit_shape_key_must_agree_with_init_from(exported, corpus, tmp_path):
    proc = cli(f"model.init_from={exported}", "model.n_layers=3", *SHORT,
               f"data.files={corpus}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        f"trainrun: error: model.n_layers: got 3, but model.init_from={exported} holds a model "
        f"with n_layer 2 (config.json); allowed: 2, or no model.n_layers (the folder's shape "
        f"is taken)\n")
    assert list(tmp_path.iterdir()) == []
    # a key that agrees is no conflict, and the others still come from the folder
    proc = cli("--cfg", "job", f"model.init_from={exported}", "model.n_layers=2", *SHORT,
               f"data.files={corpus}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    model = yaml.safe_load(proc.stdout)["model"]
    assert (model["d_model"], model["n_layers"], model["n_heads"], model["d_ff"],
            model["max_seq_len"]) == (32, 2, 2, 64, 64)


def test_the_printed_command_starts_a_run_from_a_bpe_export(bpe_run, corpus, tmp_path):
    """The export of a tokenizer=bpe run prints a command with its tokenizer (the export's
    tokenizer.json); pasted, with a short run's settings after it, it trains."""
    out = tmp_path / "hf"
    exe = Path(sys.executable).with_name("trainrun-export")
    proc = subprocess.run([str(exe), str(bpe_run), str(out)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.strip().splitlines()[-1].split("start a run from it with ", 1)[1]
    words = shlex.split(printed)
    assert words[0] == "trainrun"
    run = tmp_path / "run"
    started = cli(*words[1:], *SHORT, f"data.files={corpus}", f"hydra.run.dir={run}",
                  cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert words[1:4] == [f"model.init_from={out}", "tokenizer=hf", f"tokenizer.path={out}"]
    meta = json.loads((run / "checkpoints/step-00000002/meta.json").read_text())
    trained_with = json.loads((bpe_run / "checkpoints/step-00000010/meta.json").read_text())
    assert meta["tokenizer"]["fingerprint"] == trained_with["tokenizer"]["fingerprint"]
    assert meta["init_from"]["path"] == str(out.resolve())


def test_export_writes_a_complete_folder_or_nothing(finished_run, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    export.main([str(finished_run), str(out), "--checkpoint", "step-20"])
    printed = capsys.readouterr().out
    assert "model.init_from=" in printed and "AutoModelForCausalLM.from_pretrained" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                     "vocab.json"]
    hf = json.loads((out / "config.json").read_text())
    assert (hf["activation_function"], hf["layer_norm_epsilon"], hf["vocab_size"]) == (
        "gelu", 1e-5, VOCAB)
    with pytest.raises(SystemExit) as stop:
        export.main([str(finished_run), str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"trainrun-export: error: OUT: {out} already exists; allowed: a new or empty folder"
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit):
        export.main([str(tmp_path / "nothing"), str(tmp_path / "new")])
    assert sorted(p.name for p in tmp_path.iterdir()) == before
