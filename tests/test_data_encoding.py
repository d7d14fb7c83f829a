"""Data that is not text in its encoding (issue 13): a Latin-1 or binary file is one line
naming data.files, the file and the offset of the first bad byte; data.encoding reads text
in another encoding. Offsets are checked against Python decoding the whole file at once."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pandas as pd
import pytest
from helpers import TINY, cli, config, make_corpus, tiny, train

from trainrun.errors import ConfigError
from trainrun.textcheck import BLOCK_SIZE, first_bad_byte

ACCENTED = ["café crème brûlée", "naïve façade à la carte", "über straße, smörgåsbord"]


def reference_offset(content: bytes, encoding: str = "utf-8") -> int | None:
    """The first bad byte as Python finds it decoding the whole content at once: the first
    undecodable byte, or the first NUL byte (but in UTF-16, where 0x00 is half of most
    characters), whichever comes first."""
    try:
        content.decode(encoding)
        undecodable = None
    except UnicodeDecodeError as exc:
        undecodable = exc.start
    nul = -1 if encoding.startswith("utf-16") else content.find(b"\0")
    return min([i for i in (undecodable, nul) if i is not None and i >= 0], default=None)


# -- the offset ----------------------------------------------------------------------


@pytest.mark.parametrize("at,bad", [
    (BLOCK_SIZE - 1, b"\xc3A"),  # a lead byte ends the first block, its bad follower opens the next
    (BLOCK_SIZE - 1, b"\xe2\x82A"),  # the decoder holds two bytes over the boundary
    (BLOCK_SIZE - 2, b"\xe2\x82A"),
    (BLOCK_SIZE - 3, b"\xf0\x9f\x99A"),
    (BLOCK_SIZE - 1, b"\xf0\x9f\x99A"),
    (BLOCK_SIZE - 1, b"\xe9"),  # Latin-1 é, last byte of the first block
    (BLOCK_SIZE, b"\xe9"),  # ... first byte of the second
    (BLOCK_SIZE + 7, b"\xa9"),  # a continuation byte with nothing before it
    (BLOCK_SIZE, b"\0"),  # a NUL byte
    (BLOCK_SIZE - 2, "🙂".encode()),  # the control: valid UTF-8 across the boundary
])
def test_offset_is_the_first_bad_byte_across_block_boundaries(tmp_path, at, bad):
    content = b"x" * at + bad + b" tail\n" * 100
    path = tmp_path / "big.txt"
    path.write_bytes(content)
    assert len(content) > BLOCK_SIZE
    expected = reference_offset(content)
    assert expected == (None if bad == "🙂".encode() else at)
    found = first_bad_byte(path)
    assert (found[0] if found else None) == expected


def test_a_file_cut_inside_its_last_character(tmp_path):
    content = ("é" * 10).encode("utf-8")[:-1]
    (tmp_path / "cut.txt").write_bytes(content)
    assert first_bad_byte(tmp_path / "cut.txt", block_size=4) == (18, "byte 0xc3")
    assert reference_offset(content) == 18


@pytest.mark.parametrize("encoding,alphabet", [
    ("utf-8", "aé€🙂 \n"), ("cp1252", "aé€ \n"), ("shift_jis", "aあ漢 \n"),
    ("gb18030", "a汉🙂 \n"), ("utf-16-le", "aé€🙂 \n"),
])
def test_offset_matches_whole_file_decoding_for_any_block_size(tmp_path, encoding, alphabet):
    """Random text with random bytes overwritten, read in blocks of 1 to 64 bytes."""
    rng = random.Random(encoding)
    path = tmp_path / "random.txt"
    outcomes = set()
    for _ in range(300):
        content = bytearray("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
                            .encode(encoding))
        for _ in range(rng.choice([0, 1, 2])):
            if content:
                content[rng.randrange(len(content))] = rng.choice(b"\x81\xe9\xff\x80\xa0\xdc\0")
        path.write_bytes(content)
        expected = reference_offset(bytes(content), encoding)
        found = first_bad_byte(path, encoding, block_size=rng.choice([1, 2, 3, 5, 7, 64]))
        assert (found[0] if found else None) == expected, (bytes(content), found)
        outcomes.add(expected is None)
    assert outcomes == {True, False}  # both good and bad files were drawn


# -- through the real console script -------------------------------------------------


def latin1_corpus(tmp_path: Path) -> tuple[Path, bytes]:
    """The test corpus with accented lines in its middle, written in Latin-1."""
    lines = make_corpus(tmp_path / "plain.txt").read_text().splitlines()
    text = "\n".join(lines[:40] + ACCENTED + lines[40:]) + "\n"
    path = tmp_path / "latin1.txt"
    path.write_bytes(text.encode("latin-1"))
    return path, text.encode("latin-1")


def binary_file(tmp_path: Path) -> tuple[Path, bytes]:
    """A gzip of the corpus under a .txt name."""
    content = gzip.compress(make_corpus(tmp_path / "plain.txt").read_bytes(), mtime=0)
    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    return path, content


@pytest.mark.slow
@pytest.mark.parametrize("make", [latin1_corpus, binary_file], ids=["latin-1", "binary"])
def test_cli_file_not_utf8_is_one_line_with_file_and_offset(tmp_path, make):
    path, content = make(tmp_path)
    offset = reference_offset(content)
    assert offset is not None and offset > 0
    proc = cli(*tiny(path), f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("trainrun: error: data.files:"), lines[0]
    assert f"{path} is not UTF-8 text" in lines[0]
    assert f"0x{content[offset]:02x} at offset {offset});" in lines[0]
    assert "allowed: " in lines[0] and "data.encoding" in lines[0]
    assert proc.returncode == 2


# -- data.encoding -------------------------------------------------------------------


def write(path: Path, texts: list[str], encoding: str) -> Path:
    if path.suffix == ".txt":
        path.write_text("\n".join(texts) + "\n", encoding)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n"
                                for t in texts), encoding)
    else:
        pd.DataFrame({"text": texts}).to_csv(path, index=False, encoding=encoding)
    return path


@pytest.mark.parametrize("ext", ["txt", "jsonl", "csv"])
def test_latin1_with_data_encoding_gives_the_documents_of_its_utf8_version(tmp_path, ext):
    texts = [f"{t} #{i}" for i in range(10) for t in ACCENTED]
    (tmp_path / "utf8").mkdir(), (tmp_path / "latin1").mkdir()
    utf8 = write(tmp_path / "utf8" / f"docs.{ext}", texts, "utf-8")
    latin1 = write(tmp_path / "latin1" / f"docs.{ext}", texts, "latin-1")
    assert utf8.read_bytes() != latin1.read_bytes()

    with pytest.raises(ConfigError) as err:  # the control: read as UTF-8, it is refused
        config("data=text", f"data.files={latin1}").data.documents()
    assert err.value.key == "data.files" and str(latin1) in err.value.message

    by_line = "data.sample_by=line"  # a .txt file's lines are the documents; rows otherwise
    want = config("data=text", f"data.files={utf8}", by_line).data.documents()
    got = config("data=text", f"data.files={latin1}", "data.encoding=latin-1",
                 by_line).data.documents()
    for split in ("train", "validation"):
        assert list(got[split]["text"]) == list(want[split]["text"])
    assert sorted([*got["train"]["text"], *got["validation"]["text"]]) == sorted(texts)


def test_latin1_trains_with_data_encoding(tmp_path):
    path, _ = latin1_corpus(tmp_path)
    metrics = train(tmp_path / "run", *tiny(path, "data.encoding=latin-1",
                                            "trainer.max_steps=4"))
    assert metrics["status"] == "completed" and metrics["steps"] == 4


@pytest.mark.parametrize("encoding", ["nope", "base64", "rot13", "undefined"])
def test_data_encoding_that_is_no_text_codec_is_a_config_error(tmp_path, encoding):
    path = make_corpus(tmp_path / "c.txt")
    with pytest.raises(ConfigError) as err:
        config("data=text", f"data.files={path}", f"data.encoding={encoding}")
    assert err.value.key == "data.encoding" and repr(encoding) in err.value.message
    assert "allowed:" in err.value.message
    config("data=text", f"data.files={path}", "data.encoding=latin-1")  # the control


# -- the other sources ---------------------------------------------------------------


def test_hf_local_folder_not_utf8_names_the_file_and_offset(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    path, content = latin1_corpus(tmp_path)
    (folder / "train.txt").write_bytes(content)
    with pytest.raises(ConfigError) as err:
        config("data=hf", f"data.path={folder}").data.documents()
    assert err.value.key == "data.path"
    assert f"{folder / 'train.txt'} is not UTF-8 text" in err.value.message
    assert f"at offset {reference_offset(content)})" in err.value.message


def test_builtin_files_are_checked_too(tmp_path, monkeypatch):
    """The builtin corpus is CPython's own sources, UTF-8 (test_data checks that it loads);
    a Python whose sources are not gets one line."""
    import sysconfig

    (tmp_path / "good.py").write_text("x = 1\n")
    (tmp_path / "odd.py").write_bytes("s = 'café'\n".encode("latin-1"))
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(ConfigError) as err:
        config().data.documents()
    assert err.value.key == "data" and "odd.py is not UTF-8 text" in err.value.message
    assert "offset 8)" in err.value.message


# -- files that are not regular files --------------------------------------------------


@pytest.mark.parametrize("source", ["hf folder", "text glob", "text pipe"])
def test_a_named_pipe_among_the_data_is_one_line_not_a_hang(tmp_path, source):
    """A named pipe with no writer blocks whoever opens it; the process must end, in one
    line naming it (the timeout only guards the test run)."""
    folder = tmp_path / "data"
    folder.mkdir()
    make_corpus(folder / "a.txt")
    pipe = folder / "b.txt"
    os.mkfifo(pipe)
    if source == "hf folder":  # a file not UTF-8 beside it sent the check through the folder
        (folder / "c.txt").write_bytes(latin1_corpus(tmp_path)[1])
        overrides = [*TINY, "data=hf", f"data.path={folder}"]
    else:
        overrides = tiny(folder / "*.txt" if source == "text glob" else pipe)
    proc = cli(*overrides, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, timeout=120)
    key = "data.path" if source == "hf folder" else "data.files"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"trainrun: error: {key}: {pipe} is a named pipe (FIFO), "
                                   f"not a regular file; allowed: "
                                   + ("a folder of regular files" if source == "hf folder"
                                      else "regular files")
                                   + " (a named pipe, socket or device is never read)")
    assert not (tmp_path / "run").exists()
