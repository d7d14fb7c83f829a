"""What a document of a .txt file is (data.sample_by): by default the whole file, its
newlines included; a paragraph or a line on request; and a run recorded before the key
existed keeps reading its files a line per document."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import TINY, WORDS, assert_identical, cli, config, final_weights, tiny

from trainrun import checkpoint, data
from trainrun.data.tokenizers import ByteTokenizer

NEWLINE, EOT = ord("\n"), ByteTokenizer.eot


def play(path: Path, paragraphs: int = 40, lines: int = 3, seed: int = 0) -> Path:
    """Paragraphs of `lines` lines each, a blank line between them, as in nanoGPT's
    input.txt (a speaker's lines) or a source file."""
    rng = random.Random(seed)
    text = "\n\n".join("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
                                 for _ in range(lines)) for _ in range(paragraphs))
    path.write_text(text + "\n")
    return path


def split_tokens(loaded: data.Loaded) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(loaded.train.tokens), np.asarray(loaded.validation.tokens)


def text_of(tokens: np.ndarray) -> bytes:
    assert tokens.max() < 256
    return tokens.astype(np.uint8).tobytes()


def test_a_txt_files_newlines_reach_the_token_file(tmp_path):
    """One file (nanoGPT's case): one document, its text as the file has it, newlines and
    blank lines included; validation is its last 5 %, cut at a line start."""
    path = play(tmp_path / "input.txt")
    text = path.read_bytes()
    train, val = split_tokens(data.load(config("data=text", f"data.files={path}",
                                               "data.seq_len=16").data))
    assert int((train == NEWLINE).sum() + (val == NEWLINE).sum()) == text.count(b"\n")
    assert (train == EOT).sum() == (val == EOT).sum() == 1  # each split one document
    assert train[-1] == val[-1] == EOT
    assert text_of(train[:-1]) + text_of(val[:-1]) == text
    assert text_of(train[:-1]).endswith(b"\n")  # the cut is at a line start
    assert len(val) - 1 == pytest.approx(0.05 * len(text), abs=80)  # 5 %, to a line


@pytest.mark.parametrize("sample_by, per_file", [("line", 40 * 3), ("paragraph", 40),
                                                 ("file", 1)])
def test_line_and_paragraph_modes_give_their_document_counts(tmp_path, sample_by, per_file):
    """Two files, half held out: whole documents go to one split or the other."""
    paths = [play(tmp_path / f"{name}.txt", seed=seed) for seed, name in enumerate("ab")]
    loaded = data.load(config("data=text", f"data.files={tmp_path}/*.txt", "data.seq_len=16",
                              "data.val_fraction=0.5", f"data.sample_by={sample_by}").data)
    train, val = split_tokens(loaded)
    assert int((train == EOT).sum() + (val == EOT).sum()) == 2 * per_file
    newlines = int((train == NEWLINE).sum() + (val == NEWLINE).sum())
    if sample_by == "line":  # datasets' line documents drop their line end
        assert newlines == 0
    if sample_by == "paragraph":  # the lines of a paragraph keep theirs
        assert newlines >= 2 * 40 * 2
    if sample_by == "file":  # the two files, whole: one per split
        assert sorted([text_of(train[:-1]), text_of(val[:-1])]) == sorted(
            p.read_bytes() for p in paths)


def test_an_unknown_sample_by_is_one_line(corpus, tmp_path):
    proc = cli(*tiny(corpus, "data.sample_by=word"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == ("trainrun: error: data.sample_by: got 'word'; allowed: file, "
                           "paragraph, line\n")
    assert list(tmp_path.iterdir()) == []


def as_before_sample_by(run: Path) -> None:
    """Make `run` what trainrun wrote before data.sample_by existed: no such key in its
    overrides or its checkpoints' config (nor the later reproducibility record)."""
    overrides = run / ".hydra/overrides.yaml"
    entries = yaml.safe_load(overrides.read_text())
    overrides.write_text(yaml.safe_dump([e for e in entries if not e.startswith("data.sample_by")]))
    for path in checkpoint.complete(run / "checkpoints"):
        meta = checkpoint.read_meta(path)
        del meta["config"]["data"]["sample_by"]
        meta.pop("reproducibility", None)
        (path / checkpoint.META_FILE).write_text(json.dumps(meta, indent=2))


def test_a_run_from_before_sample_by_keeps_reading_its_files_by_line(corpus, tmp_path):
    """`resume=<dir>` continues it on the same tokens, ending bit for bit where the
    uninterrupted run ends; a command that asks for today's default, file, is refused in one
    line and changes nothing."""
    full = tmp_path / "full"
    proc = cli(*tiny(corpus, "trainer.max_steps=8", "trainer.ckpt_every=4",
                     f"hydra.run.dir={full}"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    old = tmp_path / "old"
    shutil.copytree(full, old)
    shutil.rmtree(old / "checkpoints/step-00000008")
    (old / "checkpoints/latest").write_text("step-00000004\n")
    as_before_sample_by(old)
    again = tmp_path / "again"
    shutil.copytree(old, again)

    proc = cli(f"resume={old}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_identical(final_weights(old), final_weights(full))
    assert checkpoint.read_meta(old / "checkpoints/step-00000008")["config"]["data"][
        "sample_by"] == "line"

    before = {p: p.read_bytes() for p in again.rglob("*") if p.is_file()}
    proc = cli(*TINY, "data=text", f"data.files={corpus}", "trainer.max_steps=8",
               "trainer.ckpt_every=4", "resume=auto", f"hydra.run.dir={again}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("trainrun: error: data.sample_by: the checkpoint "
                                  "step-00000004 was trained with 'line'")
    assert proc.stderr.count("\n") == 1
    assert {p: p.read_bytes() for p in again.rglob("*") if p.is_file()} == before
