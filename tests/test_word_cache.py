"""The byte-level BPE's word cache (trainrun.data.word_cache, docs/data.md, Token storage)
gives the ids that `tokenizers` gives, document by document, on text made to find where
GPT-2's pattern could be cut otherwise (random runs of spaces, control characters,
apostrophes, letters, digits and punctuation; non-ASCII text; long words; special tokens'
text); only the pipelines it reproduces use it; and the token files it writes in worker
processes are the bytes the library writes, whatever the number of workers."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from helpers import WORDS, cli, config, make_corpus, tiny

from trainrun import data
from trainrun.data import tokenizing, word_cache
from trainrun.data.tokenizer_options import BPEConfig
from trainrun.data.tokenizers import ByteTokenizer, JSONTokenizer

# characters where the pattern's classes meet: the six ASCII spaces and the ones that are
# not (\x1c-\x1f, \x85 for Python's str.isspace), apostrophes and the contractions' letters,
# digits, punctuation, control characters
ALPHABET = " \t\n\r\x0b\x0c\x1c\x1f\x00\x7f'sStTrRevVmMlLdD0123456789.,;!?-_<|>()xyzXYZ"
TRICKY = [
    "it's what we're told: they've, I'm, we'll, he'd, don't, 'S 'T 'RE O'Neil ''s '' ' s",
    "many      spaces  \t\t tabs\n\n\nnewlines \r\n crlf \x0b\x0c  \n  x   ",
    "   leading spaces", "trailing spaces   ", " ", "x\x1c\x1dy \x1e z\x1f", "\x00nul\x7fdel",
    "digits 123 4567890 12a34 1,000.5 3.14159 2024-01-01",
    "a literal <|endoftext|> is text, <|endoftext|><|endoftext|>",
    "x" * 5000, "ab1" * 2000, "!?" * 3000, " " * 3000 + "y",
    "héllo wörld — 日本語 🎉 👩‍👩‍👧 e\u0301 n\u0303 \u00a0nbsp \u3000ideographic \u2003em",
    "a\u0085b \u2028 c", "ümlaut's café's", "\u00b2 \u00bd \u2167 ١٢٣",
    "".join(chr(c) for c in range(128)),
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 80))) for _ in range(n)]
    return texts


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """trainrun's own tokenizer=bpe (vocabulary 400) trained on random text: its
    tokenizer.json."""
    import datasets

    folder = tmp_path_factory.mktemp("bpe")
    train = datasets.Dataset.from_dict({"text": random_texts(300, seed=1) + TRICKY})
    BPEConfig(vocab_size=400, min_frequency=2, eot="<|endoftext|>").train(train, folder, print)
    return folder / "tokenizer.json"


def variant(source: Path, folder: Path, **changes) -> Path:
    """source's tokenizer.json with top-level entries or pre-tokenizer settings changed."""
    spec = json.loads(source.read_text())
    for name, value in changes.items():
        if name in ("add_prefix_space", "use_regex"):
            spec["pre_tokenizer"][name] = value
        elif name == "dropout":
            spec["model"]["dropout"] = value
        else:
            spec[name] = value
    path = folder / f"{'-'.join(changes) or 'same'}.json"
    path.write_text(json.dumps(spec))
    return path


def library_ids(path: Path, texts: list[str]) -> list[list[int]]:
    """The reference: `tokenizers`' own encode of each text, special tokens' text as text."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.encode_special_tokens = True
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def byte_level(tmp_path) -> Path:
    path = tmp_path / "byte.json"
    ByteTokenizer().hf().save(str(path))  # GPT-2's pipeline: ByteLevel post-processor too
    return path


@pytest.mark.parametrize("changes", [{}, {"add_prefix_space": True},
                                     {"post_processor": {"type": "ByteLevel", "add_prefix_space":
                                                         True, "trim_offsets": False,
                                                         "use_regex": True}}, "byte"],
                         ids=["bpe", "prefix_space", "post_processor", "byte_level"])
def test_the_word_cache_gives_the_library_s_ids(bpe, tmp_path, monkeypatch, changes):
    monkeypatch.setattr(word_cache, "MAX_WORDS", 50)  # cleared many times on the way
    path = byte_level(tmp_path) if changes == "byte" else variant(bpe, tmp_path, **changes)
    tok = JSONTokenizer.from_file(path, "<|endoftext|>")
    assert tok.words is not None and tok.holds_gil
    texts = TRICKY + random_texts(400)
    ids, counts = tok.encode_many(pa.array(texts))
    expected = library_ids(path, texts)
    assert counts.tolist() == [len(e) for e in expected]
    got = np.split(ids, np.cumsum(counts)[:-1])
    for text, g, e in zip(texts, got, expected, strict=True):
        assert g.tolist() == e, repr(text)
    assert 0 < len(tok.words.words) <= 50
    # the pre-tokens themselves are the library's (ids alone may hide a cut between two
    # pieces that no merge joins)
    pre, chars = tok.tok.pre_tokenizer, tok.words.chars
    for text in texts:
        if text.isascii():
            ours = word_cache.PATTERN.findall(text)
            if changes == {"add_prefix_space": True} and not text.startswith(" "):
                ours = word_cache.PATTERN.findall(" " + text)
            assert [p.translate(chars) for p in ours] == [
                w for w, _ in pre.pre_tokenize_str(text)], repr(text)
    assert sum(t.isascii() for t in texts) > 800  # most went through the cache


@pytest.mark.parametrize("changes", [
    {"normalizer": {"type": "Lowercase"}}, {"use_regex": False}, {"dropout": 0.5},
    {"added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": False,
                       "lstrip": False, "rstrip": False, "normalized": False, "special": True},
                      {"id": 1, "content": "the", "single_word": False, "lstrip": False,
                       "rstrip": False, "normalized": False, "special": False}]},
    {"pre_tokenizer": {"type": "Whitespace"}},
    {"post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A",
     "type_id": 0}}], "pair": [{"Sequence": {"id": "A", "type_id": 0}}], "special_tokens": {}}},
], ids=["normalizer", "no_regex", "dropout", "added_token", "pre_tokenizer", "post_processor"])
def test_other_pipelines_keep_the_library_s_encode(bpe, tmp_path, changes):
    path = variant(bpe, tmp_path, **changes)
    tok = JSONTokenizer.from_file(path, "<|endoftext|>")
    assert tok.words is None and not tok.holds_gil
    texts = ["The the THE café", *TRICKY[:3]]
    ids, counts = tok.encode_many(pa.array(texts))
    if "dropout" not in changes:  # with it, the library's ids change from call to call
        assert ids.tolist() == [i for e in library_ids(path, texts) for i in e]
    # the control: the same tokenizer.json unchanged is eligible
    assert JSONTokenizer.from_file(bpe, "<|endoftext|>").words is not None


def tricky_corpus(path: Path) -> Path:
    lines = make_corpus(path, n_docs=400).read_text().splitlines()
    odd = [t.replace("\n", " ").replace("\r", " ").replace("\x0b", " ").replace("\x0c", " ")
           .replace("\x1c", " ").replace("\x1d", " ").replace("\x1e", " ").replace("\x85", " ")
           .replace("\u2028", " ").replace("\x00", " ")  # NUL: not text for data.files
           for t in TRICKY + random_texts(40, seed=2)]
    for i, line in enumerate(odd):  # one a line: no line breaks of any kind inside
        lines.insert(3 * i + 1, line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_token_files_are_the_library_s_bytes_from_1_2_3_worker_processes(
        tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizing, "CHUNK", 11)
    monkeypatch.setenv("TRAINRUN_CACHE", str(tmp_path / "cache"))  # one BPE for all
    corpus = tricky_corpus(tmp_path / "corpus.txt")
    chunks, encode_chunk = tmp_path / "chunks", tokenizing.encode_chunk

    def recorded(table, tokenizer, dtype):  # in the worker processes too (forked)
        with open(chunks, "a") as f:
            f.write(f"{os.getpid()}\n")
        return encode_chunk(table, tokenizer, dtype)

    monkeypatch.setattr(tokenizing, "encode_chunk", recorded)

    def token_files(workers: int) -> dict:
        cfg = config("data=text", f"data.files={corpus}", "data.sample_by=line",
                     "tokenizer=bpe", "tokenizer.vocab_size=400",
                     f"data.tokenize_workers={workers}")
        chunks.unlink(missing_ok=True)
        loaded = data.load(cfg.data, cfg.tokenizer)
        folder = Path(loaded.train.tokens.filename).parent
        files = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix != ".json"}
        info = json.loads((folder / "info.json").read_text())
        files["info"] = {s: {k: v for k, v in r.items() if k != "seconds"}
                         for s, r in info["splits"].items()}
        shutil.rmtree(folder)  # the next one tokenizes anew
        pids = [int(line) for line in chunks.read_text().split()]
        return files, loaded.tokenizer, pids

    with monkeypatch.context() as m:  # the reference: the library's encode_batch_fast
        m.setattr(word_cache.WordCache, "of", classmethod(lambda cls, tok, chars: None))
        library, tok, pids = token_files(1)
        assert tok.words is None and set(pids) == {os.getpid()}
    assert library["train.bin"] and set(library) == {
        "info", "train.bin", "train.offsets.npy", "validation.bin", "validation.offsets.npy"}
    for workers in (1, 2, 3):
        files, tok, pids = token_files(workers)
        assert tok.words is not None
        assert files == library, workers
        if workers == 1:  # its thread encodes
            assert set(pids) == {os.getpid()}
        else:  # every chunk (> 20 of them) in a process: `workers` of them per split
            assert os.getpid() not in pids and len(pids) > 20
            assert workers < len(set(pids)) <= 2 * workers


def test_a_stop_while_worker_processes_tokenize_ends_in_one_line(tmp_path):
    """SIGTERM as the first chunk is written: the parent stops, the worker processes (which
    ignore it) end with it, and nothing is left in the cache."""
    corpus = make_corpus(tmp_path / "corpus.txt", n_docs=3000)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = cli(*tiny(corpus, "tokenizer=bpe", "tokenizer.vocab_size=320",
                     "data.tokenize_workers=2", f"hydra.run.dir={run_dir}"),
               cwd=tmp_path, env={"TRAINRUN_CACHE": str(cache), "TRAINRUN_SIGNAL_INSIDE":
                                  "SIGTERM:trainrun.data.tokenizing.write_at"})
    assert proc.returncode == 128 + 15, proc.stderr
    assert proc.stderr == "trainrun: SIGTERM: stopped before the first update\n"
    assert "data: " in proc.stdout and "tokenized train" not in proc.stdout
    assert not run_dir.exists()
    assert [p.name for p in (cache / "tokens").iterdir() if not p.name.endswith(".lock")] == []


ORPHANS = """
import multiprocessing, os, numpy as np
from trainrun.data import tokenizing
class Tok:
    holds_gil = True
with tokenizing.processes(None, Tok(), np.dtype(np.uint16), 2) as pool:
    assert pool.submit(os.getpid).result() != os.getpid()
    print(len(multiprocessing.active_children()), flush=True)  # both forked at once
    os._exit(3)  # as a second stop signal ends the process: no shutdown of the pool
"""


def test_worker_processes_end_with_a_parent_that_ends_at_once():
    """They hold the parent's stdout: its end of file comes once both have ended (they
    ignore the stop signals and wait for work that never comes, unless PR_SET_PDEATHSIG)."""
    proc = subprocess.run([sys.executable, "-c", ORPHANS], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.split() == ["2"]
