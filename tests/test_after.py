"""trainrun-sample and trainrun-eval on a finished run: the KV cache against full
recomputation, seeded sampling, top-k/top-p against their definitions, eval against the
run's own logged validation, and bad input as one line with exit status 2."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import WORDS, make_corpus, scalars

from trainrun import data
from trainrun.after.run import open_run
from trainrun.commands import eval as evaluate
from trainrun.commands import export, sample
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.models import KVCache


def script(name: str, *args: str, cwd: Path, stdin: str | None = None):
    """A console script of the installed package, in a subprocess."""
    exe = Path(sys.executable).with_name(name)
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", f"trainrun.commands.{name[9:]}"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, input=stdin,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def one_line(capsys, prog: str, key: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: {key}"), err
    return err[0]


def exits_2(main, *argv: str) -> None:
    with pytest.raises(SystemExit) as stop:
        main(list(argv))
    assert stop.value.code == 2


def test_kv_cache_forward_equals_full_recomputation(finished_run):
    model = open_run(str(finished_run), [], data=False).model
    x = torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        # the prompt at once, then several positions over a cache (a mask), then one at a time
        parts = [model(x[:, :40], cache), model(x[:, 40:47], cache)]
        parts += [model(x[:, t:t + 1], cache) for t in range(47, 64)]
        full = model(x)
    assert len(cache) == 64
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_greedy_with_the_cache_gives_the_tokens_of_full_recomputation(finished_run):
    model = open_run(str(finished_run), [], data=False).model
    prompt = [ByteTokenizer.eot, *b"the model learns"]
    n = model.cfg.max_seq_len - len(prompt)  # up to the last position
    pick = sample.picker(0.0, 0, 1.0, ByteTokenizer.vocab_size, torch.Generator())
    cached = list(sample.generate(model, prompt, n, pick))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt):]
    # past max_seq_len the context is cut and read again: generation goes on
    assert len(list(sample.generate(model, prompt, 3 * model.cfg.max_seq_len, pick))) == 192


def test_top_k_and_top_p_keep_the_ids_of_their_definitions():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log()

    def draws(**cut) -> np.ndarray:
        pick = sample.picker(1.0, cut.get("top_k", 0), cut.get("top_p", 1.0), 4,
                             torch.Generator().manual_seed(0))
        return np.bincount([pick(logits.clone()) for _ in range(4000)], minlength=4)

    # top_p: the smallest set of most likely ids whose probability reaches p
    assert draws(top_p=0.5)[2:].sum() == 0 and draws(top_p=0.5)[:2].all()
    assert draws(top_p=0.75)[3] == 0 and draws(top_p=0.75)[:3].all()
    counts = draws(top_k=3)
    assert counts[3] == 0
    # the kept ids keep their relative probabilities: 0.4 : 0.3 : 0.2 renormalized
    assert np.allclose(counts[:3] / counts.sum(), [4 / 9, 3 / 9, 2 / 9], atol=0.03)
    assert np.allclose(draws() / 4000, probs.numpy(), atol=0.03)
    greedy = sample.picker(0.0, 0, 1.0, 4, torch.Generator())
    assert greedy(torch.tensor([0.1, 3.0, 2.0, -1.0])) == 1
    padded = sample.picker(0.0, 0, 1.0, 3, torch.Generator())  # id 3 is a padding row
    assert padded(torch.tensor([0.1, 0.0, 0.2, 9.0])) == 2


def test_the_same_seed_gives_the_same_text(finished_run, tmp_path):
    args = [str(finished_run), "the", "--temperature", "1.0", "--top-k", "50", "--top-p",
            "0.95", "--max-new-tokens", "60", "--num-samples", "2"]
    first = script("trainrun-sample", *args, "--seed", "7", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    again = script("trainrun-sample", *args, "--seed", "7", cwd=tmp_path)
    other = script("trainrun-sample", *args, "--seed", "8", cwd=tmp_path)
    assert first.stdout == again.stdout != other.stdout
    one, two = first.stdout.removeprefix("--- sample 1/2 ---\n").split("--- sample 2/2 ---\n")
    assert one.startswith("the") and two.startswith("the") and one != two
    assert "tokens/s" in first.stderr and "step-00000040" in first.stderr
    piped = script("trainrun-sample", str(finished_run), "-", "--temperature", "0",
                   "--max-new-tokens", "5", cwd=tmp_path, stdin="the model")
    assert piped.returncode == 0 and piped.stdout.startswith("the model"), piped.stderr


def test_eval_of_the_runs_validation_equals_its_logged_val_loss(finished_run, tmp_path):
    proc = script("trainrun-eval", str(finished_run), "--max-batches", "2", "--json",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    metrics = json.loads((finished_run / "metrics.json").read_text())
    assert result["loss"] == metrics["val_loss"]  # the same batches, bit for bit
    assert result["loss"] == pytest.approx(scalars(finished_run, "val/loss")[-1][1], rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    # bits per byte from the targets' own bytes: ids 0..255 are one byte each, EOT none
    run = open_run(str(finished_run), [])
    val = data.load(run.cfg.data)["validation"]
    targets = np.concatenate([val.batch(np.arange(i, i + 4))[1].numpy().ravel()
                              for i in (0, 4)])
    n_bytes = int(((targets >= 0) & (targets < 256)).sum())
    assert (result["tokens"], result["bytes"]) == (len(targets), n_bytes)
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * len(targets) / math.log(2) / n_bytes, rel=1e-6)
    assert result["step"] == 40 and result["split"] == "validation"


def test_eval_all_of_a_split_and_of_another_source(finished_run, tmp_path, capsys):
    other = make_corpus(tmp_path / "other.txt", n_docs=40, seed=5)
    evaluate.main([str(finished_run), "--json"])
    whole = json.loads(capsys.readouterr().out)
    assert whole["batches"] == math.ceil(whole["tokens"] / (4 * 32))  # packed: 32 targets each
    evaluate.main([str(finished_run), "data=text", f"data.files={other}", "data.batch_size=2",
                   "--split", "train", "--max-batches", "3", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 3 * 2 * 32 and result["loss"] != whole["loss"]
    evaluate.main([str(finished_run), "--max-batches", "2"])  # plain: one line of figures
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("loss ") and "bits_per_byte" in out[0]


def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    weights = run / "checkpoints/step-00000040/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    sample.main([str(run), "a", "--max-new-tokens", "3", "--temperature", "0"])
    err = capsys.readouterr().err
    assert "step-00000040 is damaged" in err and "using step-00000020" in err
    assert weights.exists()  # a read-only command moves nothing
    weights = run / "checkpoints/step-00000020/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")
    exits_2(evaluate.main, str(run))
    assert "no intact checkpoint" in one_line(capsys, "trainrun-eval", "RUN_DIR:")
    exits_2(sample.main, str(finished_run), "--checkpoint", "step-30")
    assert "step-00000020, step-00000040" in one_line(capsys, "trainrun-sample", "--checkpoint:")
    sample.main([str(finished_run), "--checkpoint", "20", "--max-new-tokens", "1"])
    assert "step-00000020 (update 20)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, key", [
    (["{missing}"], "RUN_DIR:"),
    (["{empty}"], "RUN_DIR:"),
    (["{run}", "--temperature", "-1"], "--temperature:"),
    (["{run}", "--top-p", "0"], "--top-p:"),
    (["{run}", "--max-new-tokens", "x"], "--max-new-tokens:"),
    (["{run}", "x", "--prompt-file", "{missing}"], "--prompt-file:"),
    (["{run}", "--prompt-file", "{missing}"], "--prompt-file:"),
    ([], "arguments:"),
])
def test_bad_sample_input_is_one_line(finished_run, tmp_path, capsys, argv, key):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    names = {"run": finished_run, "missing": tmp_path / "nothing", "empty": tmp_path / "empty"}
    exits_2(sample.main, *(a.format(**names) for a in argv))
    one_line(capsys, "trainrun-sample", key)


def test_bad_eval_input_is_one_line(finished_run, tmp_path, capsys):
    exits_2(evaluate.main, str(finished_run), "optimizer.lr=1")
    assert "allowed: data=OPTION" in one_line(capsys, "trainrun-eval", "optimizer.lr:")
    exits_2(evaluate.main, str(finished_run), "data.files=/nothing/*.txt")
    one_line(capsys, "trainrun-eval", "data.files:")
    exits_2(evaluate.main, str(finished_run), "--max-batches", "0")
    one_line(capsys, "trainrun-eval", "--max-batches:")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / ".hydra/overrides.yaml").write_text("- hydra.job.chdir=true\n")
    exits_2(evaluate.main, str(run))
    assert "refused" in one_line(capsys, "trainrun-eval", "RUN_DIR:")
    (run / ".hydra/overrides.yaml").unlink()  # the default model: not the checkpoint's
    exits_2(evaluate.main, str(run))
    assert "model.d_model=32" in one_line(capsys, "trainrun-eval", "RUN_DIR:")


def test_a_run_directory_without_a_checkpoint_fails_in_one_line_in_a_process(tmp_path):
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    for name in ("trainrun-sample", "trainrun-eval"):
        proc = script(name, str(tmp_path / "run"), cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (f"{name}: error: RUN_DIR: {tmp_path / 'run'}: no "
                                       f"checkpoints/ in it; allowed: a run directory of "
                                       f"trainrun (outputs/<date>/<time>) with a checkpoint")


def test_sample_reads_no_data_and_eval_names_the_missing_files(finished_run, corpus, tmp_path,
                                                               capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    saved = run / ".hydra/overrides.yaml"
    gone = tmp_path / "moved" / "corpus.txt"
    saved.write_text(saved.read_text().replace(str(corpus), str(gone)))
    assert str(gone) in saved.read_text()
    sample.main([str(run), "the", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("the")
    exits_2(evaluate.main, str(run))
    assert str(gone) in one_line(capsys, "trainrun-eval", "data.files:")


def another_bpe(path: Path) -> Path:
    """A valid byte-level BPE tokenizer.json of another vocabulary than bpe_run's (300 ids
    rather than 320, padded to the same 320 rows), trained on the test's words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


COMMANDS = {"eval": (evaluate.main, "trainrun-eval", ["--max-batches", "2"]),
            "sample": (sample.main, "trainrun-sample", ["a", "--max-new-tokens", "3"])}


def run_command(command: str, run: Path, out: Path) -> None:
    if command == "export":
        export.main([str(run), str(out)])
    else:
        main, _, argv = COMMANDS[command]
        main([str(run), *argv])


@pytest.mark.parametrize("command", ["eval", "sample", "export"])
def test_a_runs_tokenizer_missing_or_not_its_own_is_one_line(bpe_run, tmp_path, capsys, command):
    prog = f"trainrun-{command}"
    run = tmp_path / "run"
    shutil.copytree(bpe_run, run)
    copy = run / "tokenizer.json"
    meta = json.loads(next((run / "checkpoints").glob("step-*/meta.json")).read_text())
    assert meta["tokenizer"] == {"fingerprint": data.for_run(run).fingerprint(),
                                 "file": "tokenizer.json"}
    run_command(command, run, tmp_path / "ok")  # intact: it works
    capsys.readouterr()
    own = copy.read_text()
    planted = {"missing": None,
               "the byte tokenizer's": ByteTokenizer().hf().to_str(),
               "another bpe's": another_bpe(tmp_path / "other.json").read_text()}
    for what, text in planted.items():
        copy.unlink(missing_ok=True)
        if text is not None:
            copy.write_text(text)
        with pytest.raises(SystemExit) as stop:
            run_command(command, run, tmp_path / "out")
        assert stop.value.code == 2, what
        line = one_line(capsys, prog, "RUN_DIR:")
        assert str(copy) in line and ("is missing" if text is None else
                                      "is not the tokenizer step-00000010 was trained") in line
        assert not (tmp_path / "out").exists() and capsys.readouterr().out == ""
    copy.write_text(own)
    run_command(command, run, tmp_path / "again")


def test_a_byte_run_refuses_a_planted_tokenizer_and_an_old_meta_means_bytes(
        finished_run, bpe_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "tokenizer.json").write_text((bpe_run / "tokenizer.json").read_text())
    exits_2(evaluate.main, str(run), "--max-batches", "1")
    assert "trained with the byte tokenizer" in one_line(capsys, "trainrun-eval", "RUN_DIR:")
    (run / "tokenizer.json").unlink()
    for path in (run / "checkpoints").glob("step-*/meta.json"):  # as runs wrote it before
        meta = json.loads(path.read_text())                       # tokenizers had options
        del meta["tokenizer"], meta["schemas"]["tokenizer"]
        path.write_text(json.dumps(meta))
    sample.main([str(run), "a", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.startswith("a")
    bpe = tmp_path / "bpe"  # a bpe run's meta.json without its record is not trainrun's
    shutil.copytree(bpe_run, bpe)
    for path in (bpe / "checkpoints").glob("step-*/meta.json"):
        meta = json.loads(path.read_text())
        del meta["tokenizer"]
        path.write_text(json.dumps(meta))
    exits_2(sample.main, str(bpe), "a")
    assert "no tokenizer record for a run with BPEConfig" in one_line(capsys, "trainrun-sample",
                                                                     "RUN_DIR:")


def test_data_named_for_evaluation_is_scored_whole(finished_run, tmp_path, capsys):
    """A 500-document file given to trainrun-eval is scored whole: every token of its byte
    tokenization a target once (each document's bytes, then its end-of-document id), none of
    it held out; the loss that of a bare loop over the same stream."""
    rng = np.random.default_rng(11)
    texts = [" ".join(rng.choice([*WORDS, "café", "naïve"], size=rng.choice([1, 2, 5, 20, 60])))
             for _ in range(500)]
    held_out = tmp_path / "held-out.jsonl"
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = n_bytes + len(texts)  # the byte tokenizer: one id per byte, then the end id
    given = [str(finished_run), "data=text", f"data.files={held_out}"]

    evaluate.main([*given, "--json"])
    result = json.loads(capsys.readouterr().out)
    assert (result["tokens"], result["bytes"]) == (n_tokens, n_bytes)
    assert (result["split"], result["documents"]) == ("all", 500)
    # a bare loop: the documents in the file's order after one end-of-document id, read in
    # windows of seq_len + 1 tokens that overlap by one, so each token is a target once
    eot, T = ByteTokenizer.eot, 32
    stream = torch.tensor([eot, *(i for t in texts for i in (*t.encode("utf-8"), eot))])
    model = open_run(str(finished_run), [], data=False).model
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, T):
            window = stream[start:start + T + 1][None]
            logits = model(window[:, :-1])[0].double()
            total += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
    assert result["loss"] == pytest.approx(total / n_tokens, rel=1e-6)

    evaluate.main(given)  # the human line says what it covers too
    captured = capsys.readouterr()
    assert f"| sequences {result['sequences']:,} | tokens {n_tokens:,} | bytes {n_bytes:,}" \
        in captured.out
    assert "all 500 documents, none held out, each token a target once" in captured.err
    # unpacked, each document is read alone: all its tokens but its first are targets
    evaluate.main([*given, "data.packing=false", "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] == n_tokens - 500
    # asked for, the validation split that a run on this file would hold out
    evaluate.main([*given, "--split", "validation", "--json"])
    held = json.loads(capsys.readouterr().out)
    assert held["split"] == "validation" and held["tokens"] < n_tokens / 10


def test_sample_and_eval_set_torchs_threads_as_trainrun_does(finished_run, tmp_path, capsys):
    """--threads N (and eval's trainer.threads=N) reach torch.set_num_threads; without them
    the run's trainer.threads (auto here: the tests' OMP_NUM_THREADS=1), said in trainrun's
    own line on stderr."""
    assert os.environ["OMP_NUM_THREADS"] == "1"  # conftest: what `auto` then chooses
    try:
        torch.set_num_threads(3)
        sample.main([str(finished_run), "a", "--max-new-tokens", "1", "--threads", "2"])
        assert torch.get_num_threads() == 2
        assert "2 CPU thread(s) (trainer.threads=2" in capsys.readouterr().err
        evaluate.main([str(finished_run), "--max-sequences", "4"])
        assert torch.get_num_threads() == 1
        assert "1 CPU thread(s) (auto: OMP_NUM_THREADS=1)" in capsys.readouterr().err
        evaluate.main([str(finished_run), "trainer.threads=2", "--max-sequences", "4"])
        assert torch.get_num_threads() == 2
        torch.set_num_threads(3)
        sample.main([str(finished_run), "a", "--max-new-tokens", "1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(1)
    capsys.readouterr()
    # a real process prints the line, with the number it gave torch
    proc = script("trainrun-eval", str(finished_run), "--threads", "2", "--max-sequences", "4",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0].startswith("2 CPU thread(s) (trainer.threads=2")
    for main, prog in ((sample.main, "trainrun-sample"), (evaluate.main, "trainrun-eval")):
        exits_2(main, str(finished_run), "--threads", "0")
        assert "allowed: auto, or a whole number of threads" in one_line(capsys, prog,
                                                                         "--threads:")
