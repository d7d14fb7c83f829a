"""Translation end to end (docs/translation.md), on a made-up language pair whose translation
is a rule (helpers.translate_rule: a word mapping and a reversal): a short CPU run learns it
to BLEU >= 90 on held-out pairs; trainrun's BLEU is sacreBLEU's command line's on the same
files; batches by tokens keep their budget and cover every pair once per epoch; accumulation
and two processes give the update of one big batch computed in plain PyTorch; a resume in
the middle of an epoch is bit-identical; validation reports the plain NLL under label
smoothing; and bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_identical,
    cli,
    config,
    final_weights,
    make_pairs,
    pair_overrides,
    scalars,
    translate_rule,
    weights,
)
from test_accumulation import max_relative_difference
from test_distributed import only_run_dir, torchrun

from trainrun import checkpoint, data
from trainrun.data import IGNORE
from trainrun.data.order import DataOrder
from trainrun.update import loss_sum

BIN = Path(sys.executable).parent


def command(name: str, *args: str, cwd: Path, stdin: str | None = None):
    return subprocess.run([str(BIN / name), *args], cwd=cwd, capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"), n=2000, seed=5,
                      splits=("train", "valid", "test"))


# the short run that learns the rule: byte-level BPE makes each word an id or two
LEARN = ["tokenizer=bpe", "tokenizer.vocab_size=384", "data.max_tokens=512",
         "trainer.max_steps=500", "trainer.eval_every=250", "trainer.log_every=50",
         "trainer.ckpt_every=250", "optimizer.lr=5e-3", "scheduler=cosine", "model.dropout=0.0",
         "trainer.threads=2", "trainer.bleu_every=250", "trainer.bleu_sentences=100"]


@pytest.fixture(scope="module")
def learned(pairs, tmp_path_factory) -> Path:
    pytest.importorskip("sacrebleu")
    cwd = tmp_path_factory.mktemp("learned")
    done = cli(*pair_overrides(pairs, *LEARN), "hydra.run.dir=run", cwd=cwd, timeout=900)
    assert done.returncode == 0, done.stderr
    return cwd / "run"


def test_a_short_run_learns_the_rule_to_bleu_90_on_held_out_pairs(learned, pairs):
    result = command("trainrun-eval", str(learned), "--split", "test", "--json",
                     cwd=learned.parent)
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["sentences"] == 400 and scores["split"] == "test"
    assert scores["bleu"] >= 90, scores
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    # trainer.bleu_every logged val/bleu and val/chrf, rising
    bleu = scalars(learned, "val/bleu")
    assert [step for step, _ in bleu] == [250, 500] and bleu[1][1] > bleu[0][1]
    assert [step for step, _ in scalars(learned, "val/chrf")] == [250, 500]
    assert json.loads((learned / "metrics.json").read_text())["val_bleu"] == \
        pytest.approx(bleu[1][1], abs=1e-4)


def test_trainruns_bleu_is_sacrebleus_command_line_on_the_same_files(learned, pairs):
    """On every line of the files: the test pairs, an empty pair and a source longer than
    the model's positions (which training would drop: the loss leaves them out)."""
    cwd = learned.parent
    long = " ".join(["ka di da"] * 60)
    src, tgt = cwd / "test.src", cwd / "test.tgt"
    src.write_text((pairs / "test.src").read_text() + f"\n{long}\n")
    tgt.write_text((pairs / "test.tgt").read_text() + f"\n{translate_rule(long)}\n")
    files = [f"data.test_source_files={src}", f"data.test_target_files={tgt}"]
    for beam in ("1", "3"):
        out = command("trainrun-translate", str(learned), str(src), "--beam", beam, cwd=cwd)
        assert out.returncode == 0, out.stderr
        assert "tokens/s" in out.stderr and "1 sentence(s) longer than" in out.stderr
        hypotheses = cwd / f"hyp{beam}.txt"
        hypotheses.write_text(out.stdout)
        assert len(out.stdout.splitlines()) == 402 and out.stdout.splitlines()[400] == ""
        theirs = subprocess.run([str(BIN / "sacrebleu"), str(tgt), "-i",
                                 str(hypotheses), "-m", "bleu", "chrf", "-w", "6", "-f", "json"],
                                capture_output=True, text=True, check=True)
        bleu, chrf = json.loads(theirs.stdout)
        done = command("trainrun-eval", str(learned), *files, "--beam", beam, "--json",
                       cwd=cwd)
        assert done.returncode == 0, done.stderr
        ours = json.loads(done.stdout)
        assert ours["split"] == "test" and ours["sentences"] == 402
        assert ours["loss_pairs"] == 400  # the empty and the long pair: not read by training
        assert ours["bleu"] == pytest.approx(bleu["score"], abs=1e-6)
        assert ours["chrf"] == pytest.approx(chrf["score"], abs=1e-6)
        assert ours["bleu_signature"] == bleu["signature"]


def test_translate_keeps_every_line_in_order_and_reads_stdin(learned):
    lines = ["ka di da", "", "gu pu din kan da bu"]
    out = command("trainrun-translate", str(learned), "-", "--beam", "1", cwd=learned.parent,
                  stdin="\n".join(lines) + "\n")
    assert out.returncode == 0, out.stderr
    got = out.stdout.split("\n")
    assert got[1] == "" and len(got) == 4 and got[3] == ""
    assert got[0] == translate_rule(lines[0]) and got[2] == translate_rule(lines[2])


def test_batches_of_max_tokens_keep_the_budget_and_cover_each_pair_once_per_epoch(pairs):
    cfg = config(*pair_overrides(pairs, "data.max_tokens=200"))
    loaded = data.load_pairs(cfg.data, cfg.tokenizer, seed=cfg.trainer.seed)
    train = loaded.train
    assert len(train) > 10
    for b in range(len(train)):
        src, src_len, tgt_in, tgt_out = train.batch([b])
        padded = max(src.shape[1], tgt_in.shape[1]) * src.shape[0]
        assert padded == train.padded_tokens(b) <= 200
    counts = [len(train.buckets[b]) for b in range(len(train))]
    assert max(counts) > 2 * min(counts)  # short pairs share a batch with more of them
    order = DataOrder(len(train), cfg.trainer.seed)
    for _ in range(2):  # two epochs: each reads every pair once
        seen = np.concatenate([train.pairs_of(order.next_window(3))
                               for _ in range(-(-len(train) // 3))])
        assert sorted(seen.tolist()) == list(range(len(train.pairs)))
    assert order.epoch == 1


def big_batch_reference(pairs: Path, start: dict, steps: range, lr: float) -> dict:
    """Updates `steps` of SGD from the weights `start`, each on the pairs of its window of
    2 buckets as one padded batch: one forward pass, the loss a mean over its targets."""
    cfg = config(*pair_overrides(pairs, *SGD))
    loaded = data.load_pairs(cfg.data, cfg.tokenizer, seed=cfg.trainer.seed)
    model = cfg.model.build(loaded.tokenizer.vocab_size)
    model.load_state_dict(start, strict=False)  # the sinusoids are not saved
    order = DataOrder(len(loaded.train), cfg.trainer.seed)
    for k in range(1, steps.stop):
        window = order.next_window(2)
        if k not in steps:
            continue
        src, src_len, tgt_in, tgt_out = loaded.train.pairs.batch(loaded.train.pairs_of(window))
        model.zero_grad()
        logits = model(src, src_len, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=IGNORE)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return {name: p.detach() for name, p in model.state_dict().items() if name in start}


SGD = ["optimizer=sgd", "optimizer.lr=0.5", "scheduler=constant", "clip=none",
       "model.dropout=0.0", "data.max_tokens=160", "trainer.max_steps=4", "trainer.ckpt_every=1",
       "trainer.keep_last=10", "trainer.eval_every=100"]


@pytest.mark.slow
def test_accumulation_and_two_processes_equal_one_big_batch(pairs, tmp_path):
    one = cli(*pair_overrides(pairs, *SGD, "trainer.grad_accum_steps=2"), "hydra.run.dir=one",
              cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = torchrun(*pair_overrides(pairs, *SGD), cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    start = weights(tmp_path / "one/checkpoints/step-00000001/model.safetensors")
    reference = big_batch_reference(pairs, start, range(2, 5), 0.5)
    assert max_relative_difference(final_weights(tmp_path / "one"), reference) < 1e-5
    assert max_relative_difference(final_weights(only_run_dir(tmp_path)), reference) < 1e-5
    # the windows' buckets really differ: per-bucket means would be another update
    cfg = config(*pair_overrides(pairs, *SGD))
    train = data.load_pairs(cfg.data, cfg.tokenizer, seed=cfg.trainer.seed).train
    targets = [train.num_targets([b]) for b in range(len(train))]
    assert max(targets) > 1.2 * min(targets)


def test_a_resume_in_the_middle_of_an_epoch_is_bit_identical(pairs, tmp_path):
    args = pair_overrides(pairs, "model.dropout=0.2", "data.max_tokens=160",
                          "trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.keep_last=5",
                          "trainer.grad_accum_steps=2", "trainer.label_smoothing=0.1")
    full = cli(*args, "hydra.run.dir=full", cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints/step-00000006")
    (part / "checkpoints/latest").write_text(checkpoint.step_name(3) + "\n")
    state = torch.load(part / "checkpoints/step-00000003" / checkpoint.STATE_FILE,
                       weights_only=True)
    assert state["order"]["epoch"] == 0 and 0 < state["order"]["offset"] < state["order"]["n"]
    other = cli(f"resume={part}", "data.max_tokens=200", cwd=tmp_path)  # other batches
    assert other.returncode == 2
    assert other.stderr.startswith("trainrun: error: data.max_tokens: the checkpoint "
                                   "step-00000003 was trained with 160")
    resumed = cli(f"resume={part}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_identical(final_weights(part), final_weights(tmp_path / "full"))


def test_validation_reports_the_plain_nll_and_noam_takes_d_model_from_the_model(pairs,
                                                                              tmp_path):
    """One run: label smoothing in training, the plain NLL in val/loss (computed here from
    the final weights); scheduler=noam's rate from the encoder-decoder's d_model."""
    run = cli(*pair_overrides(pairs, "trainer.label_smoothing=0.2", "trainer.max_steps=6",
                              "trainer.eval_every=6", "trainer.eval_sequences=20",
                              "model.dropout=0.0", "scheduler=noam", "scheduler.warmup_steps=4",
                              "scheduler.scale=1.0"), "hydra.run.dir=run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    cfg = config(*pair_overrides(pairs))
    d = cfg.model.d_model
    assert [lr for _, lr in scalars(tmp_path / "run", "train/lr")] == pytest.approx(
        [d ** -0.5 * min(k ** -0.5, k * 4 ** -1.5) for k in range(1, 7)], rel=1e-6)
    loaded = data.load_pairs(cfg.data, cfg.tokenizer, seed=cfg.trainer.seed)
    model = cfg.model.build(loaded.tokenizer.vocab_size)
    model.load_state_dict(final_weights(tmp_path / "run"), strict=False)
    model.eval()
    src, src_len, tgt_in, tgt_out = loaded.validation.batch(np.arange(20))
    with torch.no_grad():
        logits = model(src, src_len, tgt_in)[..., :loaded.tokenizer.vocab_size]
    plain = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=IGNORE)
    smoothed = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=IGNORE,
                               label_smoothing=0.2)
    val = json.loads((tmp_path / "run/metrics.json").read_text())["val_loss"]
    assert val == pytest.approx(plain.item(), rel=1e-5)
    assert abs(smoothed.item() - plain.item()) > 0.05


def test_label_smoothing_spreads_its_mass_over_the_real_ids_only():
    torch.manual_seed(0)
    V, padded = 5, 8
    logits = torch.randn(2, 3, padded)
    logits[..., V:] = torch.finfo(logits.dtype).min  # the padding rows, as a model gives them

    class Model(torch.nn.Module):
        def forward(self, x):
            return logits

    y = torch.tensor([[1, 4, IGNORE], [0, 2, 3]])
    got = loss_sum(Model(), (None, y), 0.1, V)
    logp = torch.log_softmax(logits[..., :V], dim=-1)
    keep = y != IGNORE
    nll = -logp[keep].gather(1, y[keep][:, None]).squeeze(1)
    expected = (0.9 * nll + 0.1 * -logp[keep].mean(-1)).sum()
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_pairs_from_json_lines_with_a_translation_column(tmp_path):
    rows = [{"translation": {"de": s, "en": translate_rule(s)}, "id": i}
            for i, s in enumerate(["ka di da", "gu pu din", "mi bi gu pi", "ba ka"] * 10)]
    rows[3]["translation"]["en"] = ""  # an empty side: dropped, and counted
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = cli("model=transformer_tiny", "data=parallel", "data.files=pairs.jsonl",
              "data.src_lang=de", "data.tgt_lang=en", "data.val_fraction=0.1",
              "trainer.max_steps=2", "trainer.eval_every=2", "trainer.threads=1",
              "hydra.run.dir=run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    log = (tmp_path / "run/train.log").read_text()
    assert "dropped 1 train pair(s) with an empty side" in log
    assert "35 train / 4 validation pairs" in log  # 36 and 4 held out, less the empty one

    # the same rows as a `datasets` folder with splits of its own: data.path
    folder = tmp_path / "ds"
    folder.mkdir()
    for split, part in (("train", rows[:30]), ("validation", rows[30:36]), ("test", rows[36:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    cfg = config("model=transformer_tiny", "data=parallel", f"data.path={folder}",
                 "data.src_lang=de", "data.tgt_lang=en")
    splits, dropped = cfg.data.pairs(with_test=True)
    assert {k: len(v) for k, v in splits.items()} == {"train": 29, "validation": 6, "test": 4}
    assert dropped == {"train": 1, "validation": 0, "test": 0}
    assert splits["validation"][0] == {"source": rows[30]["translation"]["de"],
                                       "target": rows[30]["translation"]["en"]}


# -- bad input: one line naming the key, exit 2, nothing written ----------------------------

def misaligned(folder: Path) -> list[str]:
    (folder / "short.tgt").write_text("AKx\nIDx\n")
    return [f"data.target_files={folder / 'short.tgt'}"]


def jsonl(folder: Path) -> list[str]:
    (folder / "p.jsonl").write_text(json.dumps({"translation": {"de": "ka", "en": "AKx"}}) + "\n")
    return ["data.source_files=null", "data.target_files=null",
            "data.valid_source_files=null", "data.valid_target_files=null",
            f"data.files={folder / 'p.jsonl'}", "data.src_lang=fr", "data.tgt_lang=en"]


BAD = {
    "misaligned": (misaligned, "data.target_files", "lines against the"),
    "language": (jsonl, "data.src_lang", "'fr' is not a language"),
    "smoothing_one": (lambda f: ["trainer.label_smoothing=1.0"], "trainer.label_smoothing",
                      "0 <= label_smoothing < 1"),
    "smoothing_negative": (lambda f: ["trainer.label_smoothing=-0.1"],
                           "trainer.label_smoothing", "0 <= label_smoothing < 1"),
    "decoder_with_pairs": (lambda f: ["model=gpt_tiny"], "model", "allowed: model=transformer_tiny|"),
    "packing": (lambda f: ["data.packing=true"], "data.packing", "never packed"),
    "too_long": (lambda f: ["data.max_source_len=500"], "data.max_source_len",
                 "exceeds model.max_seq_len"),
    "budget": (lambda f: ["data.max_tokens=10"], "data.max_tokens", "longest pair"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_writes_nothing(case, pairs, tmp_path):
    more, key, says = BAD[case]
    run = cli(*pair_overrides(pairs, *more(tmp_path)), "hydra.run.dir=run", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trainrun: error: {key}:"), run.stderr
    assert says in lines[0]
    assert not (tmp_path / "run").exists()


def test_an_encoder_decoder_with_documents_is_one_line(tmp_path):
    (tmp_path / "doc.txt").write_text("some text\n")
    run = cli("model=transformer_tiny", "data=text", "data.files=doc.txt", "hydra.run.dir=run",
              cwd=tmp_path)
    assert run.returncode == 2 and "allowed: model=transformer_tiny" not in run.stderr
    assert run.stderr.startswith("trainrun: error: model: a seq2seq model (translation) with "
                                 "data of lm")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,key", [(["--beam", "0"], "--beam"),
                                      (["--max-len-a", "-1"], "--max-len-a")])
def test_bad_decoding_options_are_one_line(learned, args, key):
    out = command("trainrun-translate", str(learned), "-", *args, cwd=learned.parent, stdin="ka\n")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert out.stderr.startswith(f"trainrun-translate: error: {key}:")


def test_sample_refuses_a_translation_run(learned):
    out = command("trainrun-sample", str(learned), "ka", cwd=learned.parent)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("trainrun-sample: error: RUN_DIR: ") and "translates" in out.stderr


def test_translate_refuses_a_decoder_run(tmp_path):
    from helpers import make_corpus, tiny

    corpus = make_corpus(tmp_path / "docs.txt", n_docs=40)
    run = cli(*tiny(corpus, "trainer.max_steps=1"), "hydra.run.dir=lm", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = command("trainrun-translate", "lm", "-", cwd=tmp_path, stdin="x\n")
    assert out.returncode == 2 and "does not translate" in out.stderr


def test_a_tokenizer_of_one_side_alone_is_one_line(pairs, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(pairs / "train.tgt")],
              trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"]))
    tok.save(str(tmp_path / "target.json"))
    run = cli(*pair_overrides(pairs, "tokenizer=hf", f"tokenizer.path={tmp_path / 'target.json'}"),
              "hydra.run.dir=run", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert run.stderr.startswith("trainrun: error: tokenizer: ")
    assert "100% of the source tokens to its unknown token (the target's: 0%)" in run.stderr
    assert not (tmp_path / "run").exists()
