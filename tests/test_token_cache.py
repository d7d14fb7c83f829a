"""The data a run trains on is the data on disk (docs/data.md, Token storage): a corpus edited at
the same size and modification time is read and tokenized anew, token files that are not
as written (truncated, overwritten, ids beyond the vocabulary) are one line, a resume
after the corpus changed is refused in one line, the run directory untouched, and the token
files are the same bytes whatever the number of threads that tokenize them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, config, make_corpus, tiny, train

from trainrun import checkpoint, data, resume
from trainrun.data import storage
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.errors import ConfigError

EOT = ByteTokenizer.eot


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch) -> Path:
    """A token cache of the test's own: these tests damage it."""
    monkeypatch.setenv("TRAINRUN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def edit_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Replace `old` by `new` (as long) everywhere in the file, keeping its size and its
    modification time: what `datasets` identifies local files by."""
    assert len(old) == len(new)
    before = path.stat()
    content = path.read_bytes()
    assert old in content
    path.write_bytes(content.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def documents(loaded: data.Loaded) -> list[bytes]:
    """Every document of both splits as the token files hold it (byte tokenizer: its UTF-8
    bytes), sorted."""
    out = []
    for split in ("train", "validation"):
        tokens = np.asarray(loaded[split].tokens)
        ends = np.flatnonzero(tokens == EOT)
        out += [tokens[a:b].astype(np.uint8).tobytes()
                for a, b in zip([0, *(ends + 1)[:-1]], ends, strict=True)]
    return sorted(out)


def test_a_corpus_edited_at_the_same_size_and_time_is_tokenized_anew(tmp_path):
    corpus = make_corpus(tmp_path / "corpus.txt")
    cfg = config("data=text", f"data.files={corpus}", "data.sample_by=line").data
    first = data.load(cfg)
    assert documents(first) == sorted(line for line in corpus.read_bytes().splitlines() if line)
    edit_in_place(corpus, b"model", b"MODEL")
    second = data.load(cfg)
    # the reference: the edited file's lines (a document per line)
    assert documents(second) == sorted(line for line in corpus.read_bytes().splitlines() if line)
    assert Path(second.train.tokens.filename).parent != Path(first.train.tokens.filename).parent
    assert second.train.record["documents"] != first.train.record["documents"]


def cached_split(tmp_path) -> tuple[Path, Path, dict]:
    """A tokenized test corpus: its cache folder, the corpus, and its info.json."""
    corpus = make_corpus(tmp_path / "corpus.txt")
    loaded = data.load(config("data=text", f"data.files={corpus}", "data.sample_by=line").data)
    folder = Path(loaded.train.tokens.filename).parent
    return folder, corpus, json.loads((folder / "info.json").read_text())


def refused(corpus: Path, match: str) -> None:
    with pytest.raises(ConfigError) as err:
        data.load(config("data=text", f"data.files={corpus}", "data.sample_by=line").data)
    assert err.value.key == "data" and "\n" not in err.value.message
    assert match in err.value.message and "is damaged" in err.value.message, err.value.message


def test_a_truncated_token_file_is_one_line(tmp_path):
    folder, corpus, _ = cached_split(tmp_path)
    size = (folder / "train.bin").stat().st_size
    os.truncate(folder / "train.bin", size - 2)
    refused(corpus, f"train.bin holds {size - 2:,} bytes, info.json says {size:,}")
    proc = cli(*tiny(corpus), cwd=tmp_path)  # in a process: one line, nothing written
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        f"trainrun: error: data: the token cache {folder} is damaged (train.bin holds")
    assert not (tmp_path / "outputs").exists()


def test_ids_beyond_the_vocabulary_are_one_line(tmp_path):
    folder, corpus, info = cached_split(tmp_path)
    tokens = np.fromfile(folder / "train.bin", np.uint16)
    tokens[10:20] = 60000
    tokens.tofile(folder / "train.bin")  # the same size
    refused(corpus, "train.bin does not match its sha256 in info.json")
    info["splits"]["train"]["sha256"] = hashlib.sha256(tokens.tobytes()).hexdigest()
    info["splits"]["train"]["sampled_sha256"] = info["splits"]["train"]["sha256"]  # < 64 MiB
    (folder / "info.json").write_text(json.dumps(info))  # a cache whose checksums agree
    refused(corpus, "train.bin holds the id 60000, beyond the tokenizer's 257 ids")


def test_a_large_token_file_is_checked_by_sampled_blocks(tmp_path, monkeypatch):
    """Past VERIFY_ALL bytes the sampled blocks are checked, which include the last one."""
    monkeypatch.setattr(storage, "SAMPLES", 4)
    monkeypatch.setattr(storage, "SAMPLE_BYTES", 64)
    folder, corpus, info = cached_split(tmp_path)
    monkeypatch.setattr(storage, "VERIFY_ALL", 1024)
    tokens = np.fromfile(folder / "train.bin", np.uint16)
    assert len(storage.spans(tokens.nbytes, 2)) == 4
    tokens[-3] = 60001  # in the last sampled block
    tokens.tofile(folder / "train.bin")
    refused(corpus, "train.bin does not match the sha256 of its sampled blocks in info.json")


def test_a_resume_after_the_corpus_changed_is_one_line(tmp_path):
    corpus = make_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    proc = cli(*tiny(corpus, "trainer.max_steps=4", "trainer.ckpt_every=2",
                     f"hydra.run.dir={run}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}

    edit_in_place(corpus, b"model", b"MODEL")
    proc = cli(f"resume={run}", "trainer.max_steps=6", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(
        "trainrun: error: data: the train split is not the one checkpoint step-00000004 was "
        "trained on: its documents changed; ")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    # what the checkpoint recorded: the sha256 of the token files it was trained on
    meta = json.loads((run / "checkpoints/step-00000004/meta.json").read_text())
    folders = [p for p in (tmp_path / "cache" / "tokens").iterdir() if p.is_dir()]
    trained = {hashlib.sha256((f / "train.bin").read_bytes()).hexdigest() for f in folders}
    assert meta["data"]["train"]["tokens"] in trained and len(trained) == 2

    edit_in_place(corpus, b"MODEL", b"model")  # the control: the same data again
    proc = cli(f"resume={run}", "trainer.max_steps=6", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


# -- parallel tokenization (data.tokenize_workers) --------------------------------------

# documents of every kind a chunk must keep or drop: blank ones (empty, whitespace, Unicode
# whitespace alone), one that is a character sharing a lead byte with a space (U+2014), text
# beyond ASCII, the end-of-document token's text
ODD_LINES = ["", "  \t", "\u3000\u2003", "\u2014", "héllo wörld 日本語 🎉", " leading space",
             "a literal <|endoftext|> is text", "\x1c\x85"]


def mixed_corpus(path: Path) -> Path:
    lines = make_corpus(path).read_text().splitlines()
    for i, odd in enumerate(ODD_LINES * 5):
        lines.insert(7 * i + 3, odd)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("tokenizer", [["tokenizer=byte"],
                                       ["tokenizer=bpe", "tokenizer.vocab_size=320"]],
                         ids=["byte", "bpe"])
def test_the_token_files_are_the_same_bytes_whatever_the_number_of_workers(
        tmp_path, monkeypatch, tokenizer):
    from trainrun.data import tokenizing

    monkeypatch.setattr(tokenizing, "CHUNK", 7)  # ~50 chunks a split: the work is cut up
    monkeypatch.setattr(storage, "PROGRESS_SECONDS", 0.0)  # a progress line per chunk
    corpus = mixed_corpus(tmp_path / "corpus.txt")
    files, lines = {}, []
    for workers in (1, 2, 3):
        monkeypatch.setenv("TRAINRUN_CACHE", str(tmp_path / f"cache-{workers}"))
        cfg = config("data=text", f"data.files={corpus}", "data.sample_by=line", *tokenizer,
                     f"data.tokenize_workers={workers}")
        loaded = data.load(cfg.data, cfg.tokenizer, lines.append)
        folder = Path(loaded.train.tokens.filename).parent
        info = json.loads((folder / "info.json").read_text())
        for split in info["splits"].values():
            del split["seconds"]
        files[workers] = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix != ".json"}
        files[workers]["info"], files[workers]["key"] = info, folder.name  # in no cache key
    assert sorted(files[1]) == ["info", "key", "train.bin", "train.offsets.npy",
                                "validation.bin", "validation.offsets.npy"]
    assert files[1] == files[2] == files[3]
    # the reference: each non-blank document's ids from encode(), then the end of document
    docs, tok = cfg.data.splits(), loaded.tokenizer
    for split in ("train", "validation"):
        expected = [i for t in docs[split]["text"] if t and t.strip()
                    for i in [*tok.encode(t), tok.eot]]
        assert np.asarray(loaded[split].tokens).tolist() == expected
        assert files[1]["info"]["splits"][split]["sha256"] == hashlib.sha256(
            np.asarray(expected, np.uint16).tobytes()).hexdigest()
    done = [line for line in lines if line.startswith("tokenizing train: ")]
    assert done and all("% of " in line and "s left" in line for line in done), lines[:3]
    assert any("; 3 worker(s)" in line for line in lines)


def test_the_progress_bar_counts_the_text_bytes_of_the_split(tmp_path):
    """bar(description, total) gets the UTF-8 bytes of the split's texts (blank ones too),
    its advances add up to the text of the documents kept."""
    corpus = mixed_corpus(tmp_path / "corpus.txt")
    cfg = config("data=text", f"data.files={corpus}", "data.sample_by=line").data
    seen = {}

    @contextlib.contextmanager
    def bar(description, total):
        seen[description] = [total, 0]
        yield lambda n: seen[description].__setitem__(1, seen[description][1] + n)

    data.load(cfg, bar=bar)
    docs = cfg.splits()
    for split in ("train", "validation"):
        texts = [t for t in docs[split]["text"] if t]
        assert seen[f"tokenizing {split}"] == [
            sum(len(t.encode()) for t in texts),
            sum(len(t.encode()) for t in texts if t.strip())]


def test_a_stop_while_tokenizing_in_threads_ends_in_one_line_and_leaves_no_tokens(tmp_path):
    """SIGTERM from a worker thread as it writes its first chunk: the writer stops, the
    workers finish what they began, and the half-written folder is removed."""
    corpus = make_corpus(tmp_path / "corpus.txt")
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = cli(*tiny(corpus, "data.tokenize_workers=2", f"hydra.run.dir={run_dir}"),
               cwd=tmp_path, env={"TRAINRUN_CACHE": str(cache), "TRAINRUN_SIGNAL_INSIDE":
                                  "SIGTERM:trainrun.data.tokenizing.write_at"})
    assert proc.returncode == 128 + 15, proc.stderr
    assert proc.stderr == "trainrun: SIGTERM: stopped before the first update\n"
    assert "data: " in proc.stdout and "tokenized train" not in proc.stdout  # while tokenizing
    assert not run_dir.exists()
    assert [p.name for p in (cache / "tokens").iterdir() if not p.name.endswith(".lock")] == []


def test_a_resume_may_change_the_tokenizing_workers_not_the_data(tmp_path):

    corpus = make_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    train(run, *tiny(corpus, "trainer.max_steps=2", "data.tokenize_workers=1"))
    path = run / "checkpoints" / "step-00000002"
    meta = checkpoint.read_meta(path)
    resume.check_compatible(config(*tiny(corpus, "data.tokenize_workers=3")), meta, path)
    with pytest.raises(ConfigError) as err:  # the control: a key that changes the data
        resume.check_compatible(config(*tiny(corpus, "data.val_fraction=0.1")), meta, path)
    assert err.value.key == "data.val_fraction"
