"""data.streaming=true (docs/data.md, Streaming): the packer and the stream's position against
a flat token stream built by hand, a resume in the middle of a shard and of a shuffled chunk
equal weight for weight to an uninterrupted run, the same resume on 2 processes, and bad
input in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_identical, cli, config, final_weights, make_corpus, tiny

from trainrun import checkpoint, data
from trainrun.data.order import permutation
from trainrun.data.stream import Source, Stream
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.errors import ConfigError

T = 8  # tokens per row: seq_len


def fake_source(shards: list[list[str]]) -> Source:
    return Source(len(shards), lambda k: iter(shards[k]), {"fake": shards}, "fake")


SHARDS = [[f"doc {k}.{i} " + "x" * (i * 7 % 23) for i in range(9)] + ["  "] for k in range(4)]


def token_stream(shards: list[list[str]], seed: int, epoch: int, skip: int = 0) -> np.ndarray:
    """The epoch's tokens by hand: shards in the seeded order, the first `skip` documents of
    the source (in its own order) left out, blank ones too, each document's bytes then 256."""
    held = {(k, i) for k, i in [(k, i) for k, s in enumerate(shards)
                                for i in range(len(s))][:skip]}
    out = []
    for k in permutation(len(shards), seed, epoch):
        for i, text in enumerate(shards[int(k)]):
            if (int(k), i) not in held and text.strip():
                out += [*text.encode(), 256]
    return np.array(out)


def windows(stream: Stream, sizes: list[int]) -> list[np.ndarray]:
    """The rows (inputs then the last target) of successive windows of these sizes."""
    out = []
    for size in sizes:
        ix = stream.next_window(size)
        x, y = stream.batch(ix)
        assert stream.num_targets(ix) == size * T
        out.append(np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1))
    return out


def test_rows_are_the_epochs_token_stream_in_overlapping_windows_and_restart_anywhere():
    stream = Stream(fake_source(SHARDS), ByteTokenizer(), T, 4, (0, 3), {}).make_order(5)
    reader = stream.reader()
    tokens = token_stream(SHARDS, 5, 0, skip=3)
    rows = list(reader.rows(0, (0, 0, 0)))
    n = (len(tokens) - 1) // T
    assert len(rows) == n
    for r, (_, row) in enumerate(rows):
        assert np.array_equal(row, tokens[r * T : r * T + T + 1])
    for r in (1, 7, n // 2, n - 1):  # a restart from a row's position gives the rest
        again = [row for _, row in reader.rows(0, rows[r][0])]
        assert all(np.array_equal(a, b) for a, b in zip(again, [row for _, row in rows[r:]],
                                                         strict=True))


def test_tokenize_batches_cut_by_characters_give_the_same_rows(monkeypatch):
    """A tokenize batch ends at CHARACTERS characters too (memory does not follow the
    documents' size): the rows are those of whole batches."""
    from trainrun.data import stream_reader

    reader = Stream(fake_source(SHARDS), ByteTokenizer(), T, 4, (0, 3), {}).make_order(5).reader()
    rows = [row for _, row in reader.rows(0, (0, 0, 0))]
    monkeypatch.setattr(stream_reader, "CHARACTERS", 10)
    batches = list(reader.batches(reader.documents(0, 0, 0)))
    assert len(batches) > 10 and all(sum(len(t) for *_, t in b[:-1]) < 10 for b in batches)
    again = [row for _, row in reader.rows(0, (0, 0, 0))]
    assert all(np.array_equal(a, b) for a, b in zip(again, rows, strict=True))
    assert again[0].dtype == np.uint16


def test_chunks_shuffle_the_rows_and_a_saved_position_continues_exactly():
    source = fake_source(SHARDS)
    stream = Stream(source, ByteTokenizer(), T, 4, (0, 0), {}).make_order(1)
    sizes = [3, 5, 1, 6, 2, 7] * 12  # over chunk ends, and on into epochs 1, 2 and 3
    seen = windows(stream, sizes[:9])
    state = stream.state_dict()
    rest = windows(stream, sizes[9:])
    assert stream.epoch >= 2
    other = Stream(source, ByteTokenizer(), T, 4, (0, 0), {}).make_order(1)
    other.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(windows(other, sizes[9:]), rest,
                                                     strict=True))
    # every row of epoch 0 once, each chunk of 4 a permutation of its rows
    rows = np.concatenate(seen + rest)
    tokens = token_stream(SHARDS, 1, 0)
    n = (len(tokens) - 1) // T
    epoch0 = np.stack([tokens[r * T : r * T + T + 1] for r in range(n)])
    assert not np.array_equal(rows[:n], epoch0)
    for c in range(0, n, 4):
        assert sorted(map(tuple, rows[c : min(c + 4, n)])) == sorted(map(tuple, epoch0[c : c + 4]))
    for stop in (stream, other):
        stop.close()


def test_a_position_of_another_seed_or_buffer_is_refused():
    stream = Stream(fake_source(SHARDS), ByteTokenizer(), T, 4, (0, 0), {}).make_order(1)
    state = stream.state_dict()
    with pytest.raises(ConfigError, match="trainer.seed"):
        Stream(fake_source(SHARDS), ByteTokenizer(), T, 4, (0, 0), {}).make_order(2) \
            .load_state_dict(state)
    with pytest.raises(ConfigError, match="data.shuffle_buffer"):
        Stream(fake_source(SHARDS), ByteTokenizer(), T, 8, (0, 0), {}).make_order(1) \
            .load_state_dict(state)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards")
    for i in range(3):
        make_corpus(folder / f"part-{i}.txt", n_docs=40, seed=i)
    return folder


def stream_args(shards: Path, *more: str) -> list[str]:
    return tiny(shards / "*.txt", "data.streaming=true", "data.shuffle_buffer=8",
                "data.val_documents=15", *more)


def test_validation_is_the_first_documents_and_training_never_reads_them(shards):
    loaded = data.load(config(*stream_args(shards)).data)
    first = (shards / "part-0.txt").read_text().splitlines()[:15]
    expected = np.array([t for line in first if line.strip() for t in [*line.encode(), 256]])
    assert np.array_equal(np.asarray(loaded.validation.tokens), expected)
    assert loaded.train.held == (0, 15)
    assert isinstance(loaded.train, data.Stream)


N = 8


@pytest.fixture(scope="module")
def full(tmp_path_factory, shards) -> Path:
    """An uninterrupted streaming run of N updates, a checkpoint every 3 (dropout on: the
    generators are restored too)."""
    cwd = tmp_path_factory.mktemp("stream-full")
    proc = cli(*stream_args(shards, f"trainer.max_steps={N}", "trainer.ckpt_every=3",
                            "trainer.keep_last=5", "model.dropout=0.1", "optimizer=sgd",
                            "optimizer.lr=0.5", "scheduler=constant", "data.batch_size=6",
                            "hydra.run.dir=run"), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return cwd / "run"


def rewind(run: Path, copy: Path, step: int) -> Path:
    shutil.copytree(run, copy)
    for path in checkpoint.complete(copy / "checkpoints"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    (copy / "checkpoints/latest").write_text(checkpoint.step_name(step) + "\n")
    return copy


def test_a_resume_in_the_middle_of_a_shard_ends_with_the_same_weights(full, tmp_path):
    import torch

    state = torch.load(full / "checkpoints/step-00000003/trainer_state.pt", weights_only=True)
    start, taken = state["order"]["start"], state["order"]["taken"]
    assert start[1] > 0 and 0 < taken < 8  # a document of its shard past the first; a chunk
    part = rewind(full, tmp_path / "part", 3)
    proc = cli(f"resume={part}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_identical(final_weights(part), final_weights(full))


@pytest.mark.slow
def test_two_processes_continue_the_stream_of_one(full, tmp_path):
    """A resume on 2 processes with half the micro-batch trains on the same windows."""
    from test_accumulation import max_relative_difference
    from test_distributed import torchrun

    part = rewind(full, tmp_path / "part", 3)
    proc = torchrun(f"resume={part}", "data.batch_size=3", "model.dropout=0.0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    reference = rewind(full, tmp_path / "reference", 3)
    proc = cli(f"resume={reference}", "model.dropout=0.0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert max_relative_difference(final_weights(part), final_weights(reference)) < 1e-5


def test_a_sweep_over_the_streams_keys_runs_each_job(shards, tmp_path):
    """The keys sweep as any other; each job reads its own stream, whose thread ends with it."""
    import csv

    proc = cli("-m", *stream_args(shards, "trainer.max_steps=2", "trainer.eval_every=2"),
               "data.shuffle_buffer=1,8", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with (tmp_path / "sweep/summary.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["status"], r["steps"]) for r in rows] == [("completed", "2")] * 2
    assert sorted(o for r in rows for o in r["overrides"].split() if "shuffle_buffer" in o) \
        == ["data.shuffle_buffer=1", "data.shuffle_buffer=8"]  # rows sorted by best val loss


@pytest.mark.parametrize(("override", "key"), [
    ("data.packing=false", "data.packing"),
    ("tokenizer=bpe", "tokenizer"),
    ("data.max_documents=5", "data.max_documents"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer"),
])
def test_what_a_stream_cannot_do_is_refused(shards, override, key):
    with pytest.raises(ConfigError) as err:
        config(*stream_args(shards, override))
    assert err.value.key == key


def test_bad_streaming_input_is_one_line_and_writes_nothing(shards, tmp_path):
    proc = cli(*stream_args(shards, "data.packing=false"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("trainrun: error: data.packing: false with "
                                  "data.streaming=true")
    assert list(tmp_path.iterdir()) == []
    proc = cli("data.streaming=true", cwd=tmp_path)  # data=builtin does not stream
    assert proc.returncode == 2 and "data.streaming" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_resume_on_files_that_changed_is_refused_in_one_line(full, shards, tmp_path):
    """A stream's record names each file by path, size and modification time."""
    import os

    part = rewind(full, tmp_path / "part", 3)
    file = shards / "part-1.txt"
    times = os.stat(file)
    os.utime(file, ns=(times.st_atime_ns, times.st_mtime_ns + 10**9))
    try:
        proc = cli(f"resume={part}", cwd=tmp_path)
    finally:
        os.utime(file, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("trainrun: error: data: the train stream (3 file(s)) is not "
                                  "the one checkpoint step-00000003 was trained on: its "
                                  "documents changed")


def test_a_folder_with_a_validation_split_gives_its_first_documents(tmp_path):
    import json

    for split, n in (("train", 30), ("validation", 12)):
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": f"{split} document {i} " * 3}) + "\n" for i in range(n)))
    cfg = config(*TINY_HF, f"data.path={tmp_path}", "data.streaming=true",
                 "data.val_documents=5")
    loaded = data.load(cfg.data)
    expected = [t for i in range(5) for t in [*f"validation document {i} ".encode() * 3, 256]]
    assert np.asarray(loaded.validation.tokens).tolist() == expected
    assert loaded.train.held == (0, 0)  # training reads all of its own split
    first = next(loaded.train.reader().rows(0, (0, 0, 0)))[1]
    assert bytes(first[:14].tolist()) == b"train document"


TINY_HF = [o for o in tiny(Path("unused")) if not o.startswith(("data=", "data.files",
                                                                  "data.sample_by"))] + ["data=hf"]


def within(seconds: float, call):
    """call()'s result or exception; a safety net against a hang, not a timing."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result(timeout=seconds)


def failing_source(after: int, error: Exception) -> Source:
    """One shard of documents that, read a second time (epoch 1), raises `error` after
    `after` of them."""
    opened = []

    def open_shard(k: int):
        opened.append(k)
        for i in range(after):
            yield f"document {i} " * 3
        if len(opened) > 1:
            raise error

    return Source(1, open_shard, {"failing": after}, "failing")


def test_an_error_of_the_reader_is_raised_by_every_later_window_and_never_hangs():
    stream = Stream(failing_source(20, OSError("disk gone")), ByteTokenizer(), T, 2, (0, 0),
                    {}).make_order(0)

    def windows_until_error():
        for n in range(1000):
            try:
                stream.next_window(3)
            except OSError as error:
                return n, error
        raise AssertionError("no error")

    n, error = within(60, windows_until_error)
    assert n > 0 and str(error) == "disk gone"
    for _ in range(3):  # every call, at once: the reader has ended
        with pytest.raises(OSError, match="disk gone"):
            within(60, lambda: stream.next_window(3))
    stream.close()


def test_a_stop_while_the_reader_stalls_leaves_the_position_as_it_was():
    import threading

    from trainrun.data.stream import StreamStopped

    stalled, release = threading.Event(), threading.Event()

    def open_shard(k: int):
        for i in range(10):
            yield f"document {i} " * 3
        stalled.set()
        release.wait()  # a network that does not answer
        yield from ()

    stream = Stream(Source(1, open_shard, {}, "stalling"), ByteTokenizer(), T, 2, (0, 0),
                    {}).make_order(0)
    stream.stopping = stalled.is_set  # the stop comes once the reader waits
    before = None
    with pytest.raises(StreamStopped):
        for _ in range(1000):
            before = stream.state_dict()
            within(60, lambda: stream.next_window(3))
    assert stream.state_dict() == before and stream._prefetch is None  # let go, not waited for
    release.set()  # the network answers: the reader, told to stop, ends


def test_close_ends_the_reader_between_documents():
    import threading

    endless = Source(1, lambda k: (f"document {i} " for i in iter(int, 1)), {}, "endless")
    stream = Stream(endless, ByteTokenizer(), T, 1, (0, 0), {}).make_order(0)
    stream.next_window(2)
    prefetch = stream._prefetch
    with prefetch._ready:  # the reader fills what it may read ahead: 2 windows and a chunk
        assert prefetch._ready.wait_for(lambda: prefetch._rows >= 2 * 2 + 1, timeout=60)
    stream.close()
    assert not prefetch._thread.is_alive()
    assert "trainrun-stream" not in [t.name for t in threading.enumerate()]


def test_a_file_not_in_its_encoding_is_one_line_at_start_up_and_named_mid_way(tmp_path,
                                                                             monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    make_corpus(folder / "a.txt", n_docs=40, seed=0)
    (folder / "b.txt").write_bytes(b"caf\xe9\n" * 5)
    run = tmp_path / "run"
    run.mkdir()
    proc = cli(*tiny(folder / "*.txt", "data.streaming=true", "data.val_documents=5"), cwd=run)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"trainrun: error: data.files: {folder / 'b.txt'} is not "
                                  f"UTF-8 text (byte 0xe9 at offset 3)")
    assert list(run.iterdir()) == []
    # past the checked prefix, the stream meets it mid-run: one line naming the file
    from trainrun.data import sources
    from trainrun.data.stream import StreamFailed

    monkeypatch.setattr(sources, "PREFIX", 2)
    cfg = config(*tiny(folder / "*.txt", "data.streaming=true", "data.val_documents=5")).data
    train, _ = sources.TextDataConfig.stream_sources(cfg)
    with pytest.raises(StreamFailed) as err:
        list(train.open(1))
    assert err.value.key == "data.encoding" and str(folder / "b.txt") in str(err.value)


def test_eval_of_a_streaming_run_scores_validation_without_reading_the_stream(full, capsys,
                                                                              monkeypatch):
    """--split all would tokenize the whole corpus into the cache: refused unless data is
    named; --split validation reads the validation slice alone."""
    from trainrun.commands import eval as evaluate
    from trainrun.data.stream_reader import Reader

    with pytest.raises(SystemExit) as stop:
        evaluate.main([str(full), "--split", "all"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and sum("error" in line for line in err) == 1, err
    assert err[-1].startswith("trainrun-eval: error: --split: all of a run with "
                             "data.streaming=true")

    def unread(*args, **kwargs):
        raise AssertionError("the training stream was read")

    monkeypatch.setattr(Reader, "rows", unread)
    evaluate.main([str(full), "--split", "validation", "--json"])
    assert '"split": "validation"' in capsys.readouterr().out


def test_a_stop_while_waiting_on_a_stalled_reader_saves_the_position_before(full, shards,
                                                                            tmp_path):
    """The reader stalls before its fourth chunk (row 24: update 5's window) and SIGTERM
    comes while the loop waits for it: update 4 is saved, and the resume ends as `full`."""
    run = tmp_path / "run"
    proc = cli(*stream_args(shards, f"trainer.max_steps={N}", "trainer.ckpt_every=3",
                            "trainer.keep_last=5", "model.dropout=0.1", "optimizer=sgd",
                            "optimizer.lr=0.5", "scheduler=constant", "data.batch_size=6",
                            f"hydra.run.dir={run}"),
               cwd=tmp_path, env={"TRAINRUN_STREAM_STALL_AT": "3"}, timeout=120)
    assert proc.returncode == 128 + 15, proc.stderr
    assert "stopped after update 4, while waiting for the stream's rows" in proc.stdout
    assert (run / "checkpoints/latest").read_text().strip() == checkpoint.step_name(4)
    proc = cli(f"resume={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_identical(final_weights(run), final_weights(full))


def test_lrfind_on_a_stream_ends_its_reader(shards, tmp_path):
    import threading

    from trainrun.commands import lrfind

    lrfind.main([*stream_args(shards, "lrfind.num_updates=4"), f"out={tmp_path / 'find'}"])
    assert (tmp_path / "find/lrfind.csv").exists()
    assert "trainrun-stream" not in [t.name for t in threading.enumerate()]


def test_a_folder_not_utf8_is_refused_in_one_line_before_it_streams(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "caf\xe9"}\n' * 3)
    cfg = config(*TINY_HF, f"data.path={tmp_path}", "data.streaming=true")
    with pytest.raises(ConfigError) as err:
        data.load(cfg.data)
    assert err.value.key == "data.path"
    assert f"{tmp_path / 'train.jsonl'} is not UTF-8 text (byte 0xe9 at offset 13)" \
        in str(err.value)
