"""Tokenizers and token storage (docs/data.md): a BPE trained on the data round-trips
text and is what the token files hold; runs train with bpe and with a tokenizer.json of
one's own; resume is exact with bpe and refuses another tokenizer; the vocabulary is padded
to a multiple of 64; two processes tokenizing at once leave one intact cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import WORDS, assert_identical, cli, config, final_weights, scalars, tiny, train
from test_resume import rewind

from trainrun import data
from trainrun.data import storage
from trainrun.data.tokenizers import JSONTokenizer
from trainrun.errors import ConfigError
from trainrun.models import GPT

BPE = ["tokenizer=bpe", "tokenizer.vocab_size=320"]
TEXTS = ["def main():\n    return 0\n", "héllo wörld — 日本語 🎉", "a literal <|endoftext|> is text",
         "  two  spaces\tand a tab", ""]


def test_a_bpe_trained_on_the_builtin_data_round_trips_text_and_fills_the_token_files():
    cfg = config("tokenizer=bpe", "tokenizer.vocab_size=512", "data.max_documents=40")
    loaded = data.load(cfg.data, cfg.tokenizer)
    tok = loaded.tokenizer
    assert tok.vocab_size == 512 and tok.eot == tok.tok.token_to_id("<|endoftext|>")
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.eot not in ids  # the special token's text is text
        assert tok.tok.decode(ids) == text
        step = tok.streamer()
        assert "".join(step(i) for i in ids) == text
    # merges learnt: Python source takes far fewer ids than bytes
    source = "    def __init__(self, name):\n        self.name = name\n"
    assert len(tok.encode(source)) < len(source.encode()) / 2
    # the token file holds each training document's ids then the end of document, as the
    # `tokenizers` library itself gives them from the cached tokenizer.json
    from tokenizers import Tokenizer

    reference = Tokenizer.from_str(tok.to_str())
    reference.encode_special_tokens = True
    docs = cfg.data.splits()["train"]["text"]
    expected = [i for t in docs if t.strip() for i in (*reference.encode(t).ids, tok.eot)]
    assert loaded.train.tokens.dtype == np.uint16
    assert loaded.train.tokens.tolist() == expected
    # bits per byte counts the bytes each id stands for
    sizes = tok.token_bytes()
    assert sizes[tok.eot] == 0
    assert sum(sizes[i] for i in tok.encode(TEXTS[1])) == len(TEXTS[1].encode())


def test_a_run_with_bpe_trains_with_falling_loss_and_keeps_its_tokenizer(corpus, tmp_path):
    summary = train(tmp_path / "run", *tiny(corpus, *BPE, "trainer.max_steps=30",
                                            "trainer.eval_every=10"))
    val = [v for _, v in scalars(tmp_path / "run", "val/loss")]
    assert summary["status"] == "completed" and val[-1] < val[0] - 0.3
    kept = JSONTokenizer.from_file(tmp_path / "run" / "tokenizer.json", None)
    meta = json.loads(next((tmp_path / "run" / "checkpoints").glob("step-*/meta.json"))
                      .read_text())
    assert meta["tokenizer"] == {"fingerprint": kept.fingerprint(), "file": "tokenizer.json"}
    assert data.for_run(tmp_path / "run").fingerprint() == kept.fingerprint()


def own_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json with `</s>` as its end of text, as a user might bring."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tok.save(str(path))
    return path


def test_an_hf_tokenizer_from_a_local_file_trains(corpus, tmp_path):
    path = own_tokenizer(tmp_path / "mine.json")
    summary = train(tmp_path / "run", *tiny(corpus, "tokenizer=hf", f"tokenizer.path={path}",
                                            "data.seq_len=16", "trainer.max_steps=30"))
    val = [v for _, v in scalars(tmp_path / "run", "val/loss")]
    assert summary["status"] == "completed" and val[-1] < val[0]
    tok = data.for_run(tmp_path / "run")
    assert tok.eot == tok.tok.token_to_id("</s>") and tok.vocab_size == len(set(WORDS)) + 2
    # the folder form, and a named end of document that the tokenizer lacks
    (tmp_path / "folder").mkdir()
    path.rename(tmp_path / "folder" / "tokenizer.json")
    with pytest.raises(ConfigError, match="has no token 'eos'"):
        cfg = config(*tiny(corpus, "tokenizer=hf", f"tokenizer.path={tmp_path / 'folder'}",
                           "tokenizer.eot=eos"))
        data.load(cfg.data, cfg.tokenizer)


@pytest.mark.parametrize("override,message", [
    ("tokenizer.path=/no/such/tokenizer.json", "no such file or folder"),
    ("tokenizer.path=.", "a folder without tokenizer.json"),
])
def test_a_bad_hf_tokenizer_path_is_one_line_before_any_directory(corpus, tmp_path, override,
                                                                  message):
    proc = cli(*tiny(corpus, "tokenizer=hf", override), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("trainrun: error: tokenizer.path: ") and message in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_hub_tokenizer_with_the_hub_turned_off_is_one_line(corpus, tmp_path):
    proc = cli(*tiny(corpus, "tokenizer=hf", "tokenizer.path=org/name"), cwd=tmp_path,
               env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == (
        "trainrun: error: tokenizer.path: 'org/name': the hub is turned off (HF_HUB_OFFLINE=1) "
        "and 'org/name' is not in the local cache; allowed: a local file or folder, or a hub "
        "name once online (HF_HUB_OFFLINE unset)\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, why", [
    ("RepoNotFound", "no such repository on http://127.0.0.1:{port} (or it is private or gated)"),
    ("EntryNotFound", "the repository has no tokenizer.json"),
])
def test_a_hub_that_answers_not_found_is_one_line(corpus, tmp_path, code, why):
    """A real HTTP server as the hub (HF_ENDPOINT), answering 404 as the hub does."""
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    try:
        proc = cli(*tiny(corpus, "tokenizer=hf", "tokenizer.path=org/name"), cwd=tmp_path,
                   env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}"})
    finally:
        hub.shutdown()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == (f"trainrun: error: tokenizer.path: 'org/name': "
                           f"{why.format(port=hub.server_port)}; allowed: a tokenizer.json, a "
                           f"folder holding one, or a hub name with one\n")
    assert list(tmp_path.iterdir()) == []


def test_the_vocabulary_is_padded_to_64_and_padding_never_wins(corpus):
    cfg = config(*tiny(corpus, *BPE))
    tok = data.load(cfg.data, cfg.tokenizer).tokenizer
    model = GPT(cfg.model, tok.vocab_size)
    assert model.tok_emb.num_embeddings == 320 and tok.vocab_size <= 320
    cfg = config("model=gpt2_124m")
    with torch.device("meta"):
        gpt2 = GPT(cfg.model, 50257)
    assert gpt2.tok_emb.num_embeddings == 50304 and gpt2.num_params() == 124_439_808
    small = GPT(config(*tiny(corpus)).model, 257)
    logits = small(torch.randint(0, 257, (2, 8)))
    assert (logits.argmax(-1) < 257).all() and (torch.softmax(logits, -1)[..., 257:] == 0).all()


RESUME = ["trainer.max_steps=12", "trainer.ckpt_every=6", "trainer.keep_last=10",
          "trainer.eval_every=6", "model.dropout=0.2", "trainer.grad_accum_steps=2"]


def test_resume_with_bpe_is_bit_identical_and_refuses_another_tokenizer(corpus, tmp_path):
    full = tmp_path / "full"
    proc = cli(*tiny(corpus, *BPE, "data.packing=false", *RESUME, f"hydra.run.dir={full}"),
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    part = rewind(full, tmp_path / "part", 6)
    proc = cli(f"resume={part}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_identical(final_weights(part), final_weights(full))

    before = {p: p.stat().st_mtime_ns for p in full.rglob("*")}
    for other in (["tokenizer=byte"], ["tokenizer.vocab_size=300"]):
        proc = cli(f"resume={full}", *other, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("trainrun: error: tokenizer")
    assert {p: p.stat().st_mtime_ns for p in full.rglob("*")} == before


def test_resume_refuses_an_hf_tokenizer_file_that_changed(corpus, tmp_path):
    path = own_tokenizer(tmp_path / "mine.json")
    run = tmp_path / "run"
    overrides = tiny(corpus, "tokenizer=hf", f"tokenizer.path={path}", "data.seq_len=16",
                     "trainer.max_steps=4", f"hydra.run.dir={run}")
    assert cli(*overrides, cwd=tmp_path).returncode == 0
    spec = json.loads(path.read_text())
    spec["model"]["vocab"]["extra"] = len(spec["model"]["vocab"])
    path.write_text(json.dumps(spec))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    proc = cli(f"resume={run}", "trainer.max_steps=8", cwd=tmp_path)
    assert proc.returncode == 2 and "trainrun: error: tokenizer: gives other ids" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


LOADER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import config
from trainrun import data
cfg = config(*sys.argv[2:])
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.005)
loaded = data.load(cfg.data, cfg.tokenizer, print)
print("sum", int(loaded.train.tokens.sum()), int(loaded.validation.tokens.sum()))
"""


def test_two_processes_tokenizing_at_once_leave_one_intact_cache(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "TRAINRUN_CACHE": str(cache)}
    overrides = ["tokenizer=bpe", "tokenizer.vocab_size=400", "data.max_documents=120"]
    script = LOADER.format(tests=str(Path(__file__).parent))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "go"), *overrides],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    time.sleep(3)  # both imported and waiting
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    stdout = [out for out, _ in outs]
    # one process trained and tokenized; the other waited, then read the same files
    assert sum(out.count("trained the BPE tokenizer") for out in stdout) == 1
    assert sum(out.count("tokenized train") for out in stdout) == 1
    sums = {out.splitlines()[-1] for out in stdout}
    assert len(sums) == 1
    folders = [p for p in (cache / "tokens").iterdir() if not p.name.endswith(".lock")]
    assert len(folders) == 1 and folders[0].is_dir()  # no temporary folder left
    assert sorted(p.name for p in folders[0].iterdir()) == [
        "info.json", "train.bin", "train.offsets.npy", "validation.bin",
        "validation.offsets.npy"]
    info = json.loads((folders[0] / "info.json").read_text())
    tokens, offsets = storage.open_split(folders[0], "train")
    assert len(tokens) == info["splits"]["train"]["tokens"] == offsets[-1]
    trained = next((cache / "tokenizers").glob("*/tokenizer.json"))
    eot = JSONTokenizer.from_file(trained, "<|endoftext|>").eot
    assert set(tokens[offsets[1:] - 1].tolist()) == {eot}  # each document ends with it
