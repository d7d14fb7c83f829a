"""data=mix (docs/data.md, Mixtures): sources drawn by weight in one seeded stream that does
not depend on the window size, each source counting its own epochs; per-source validation;
exact resume, on another number of processes too; bad input in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    TINY,
    assert_identical,
    cli,
    config,
    final_weights,
    make_corpus,
    scalars,
    train,
)
from test_accumulation import max_relative_difference
from test_distributed import torchrun
from test_validation import reference_val_loss

from trainrun import data
from trainrun.data import Mixture, Sequences
from trainrun.data.mixture import BLOCK, MixOrder
from trainrun.data.order import DataOrder
from trainrun.errors import ConfigError

SIZES, NAMES = [7, 50, 3], ["a", "b", "c"]
WEIGHTS = {"a": 1.0, "b": 2.0, "c": 0.5}


def stream(order: MixOrder, sizes: list[int]) -> np.ndarray:
    return np.concatenate([order.next_window(n) for n in sizes])


def test_the_stream_does_not_depend_on_the_window_sizes():
    total = 3 * BLOCK + 17  # across blocks of draws
    one = stream(MixOrder(SIZES, NAMES, WEIGHTS, seed=5), [total])
    cuts = stream(MixOrder(SIZES, NAMES, WEIGHTS, seed=5), [1, 3, 1000, 5000, total - 6004])
    assert np.array_equal(one, cuts)
    assert not np.array_equal(one, stream(MixOrder(SIZES, NAMES, WEIGHTS, seed=6), [total]))


def test_draws_follow_the_weights_and_each_source_its_own_seeded_epochs():
    order = MixOrder(SIZES, NAMES, WEIGHTS, seed=1)
    drawn = order.next_window(70_000)
    which = np.searchsorted(np.cumsum(SIZES), drawn, side="right")
    shares = np.bincount(which, minlength=3) / len(drawn)
    assert shares == pytest.approx([1 / 3.5, 2 / 3.5, 0.5 / 3.5], abs=0.01)
    seen = order.seen()
    assert sum(s["sequences"] for s in seen.values()) == 70_000
    for i, name in enumerate(NAMES):
        assert seen[name]["sequences"] == (which == i).sum()
        assert seen[name]["epochs"] == pytest.approx((which == i).sum() / SIZES[i], abs=1e-4)
        # the source's draws are its own DataOrder's stream, epoch after epoch
        own = DataOrder(SIZES[i], order.orders[i].seed)
        expected = np.concatenate([own.next_window(SIZES[i])
                                   for _ in range(-(-(which == i).sum() // SIZES[i]))])
        start = sum(SIZES[:i])
        assert np.array_equal(drawn[which == i] - start, expected[:(which == i).sum()])


def test_a_loaded_position_continues_the_stream_and_new_weights_continue_each_source():
    whole = stream(MixOrder(SIZES, NAMES, WEIGHTS, seed=2), [500, 300])
    first = MixOrder(SIZES, NAMES, WEIGHTS, seed=2)
    first.next_window(500)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint keeps it
    again = MixOrder(SIZES, NAMES, WEIGHTS, seed=2)
    again.load_state_dict(state)
    assert np.array_equal(again.next_window(300), whole[500:]) and again.notes == []
    reweighted = MixOrder(SIZES, NAMES, {"a": 0.0, "b": 1.0, "c": 1.0}, seed=2)
    reweighted.load_state_dict(state)
    assert "the draws after 500 follow the new weights" in reweighted.notes[0]
    later = reweighted.next_window(300)
    assert not np.isin(later, np.arange(SIZES[0])).any()  # weight 0: never drawn
    b = later[(later >= 7) & (later < 57)] - 7
    assert np.array_equal(b, take(first.orders[1], len(b)))  # from where b stood


def take(order: DataOrder, n: int) -> np.ndarray:
    """The next n indices of a source's own order, across its epochs."""
    got = [order.next_window(n)]
    while sum(map(len, got)) < n:
        got.append(order.next_window(n - sum(map(len, got))))
    return np.concatenate(got)


def test_a_mixture_batch_is_each_sources_rows_in_order():
    rng = np.random.default_rng(0)
    parts = {n: Sequences(rng.integers(0, 50, 40 * (i + 1)).astype(np.uint16), None, 4, True, 0)
             for i, n in enumerate("xy")}
    mix = Mixture(parts, {"x": 1, "y": 1})
    idx = np.array([12, 0, 3, 25, 9, 11])
    x, y = mix.batch(idx)
    for row, i in enumerate(idx):
        part, local = ("x", i) if i < len(parts["x"]) else ("y", i - len(parts["x"]))
        px, py = parts[part].batch(np.array([local]))
        assert (x[row] == px[0]).all() and (y[row] == py[0]).all()
    assert mix.num_targets(idx) == 6 * 4


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mix")
    return {"web": make_corpus(folder / "web.txt", n_docs=120, seed=1),
            "code": make_corpus(folder / "code.txt", n_docs=12, seed=2)}


def mix_args(sources: dict[str, Path], web: float = 3, code: float = 1, *more: str) -> list[str]:
    """TINY on a mixture of the two corpora, a document per line, padded (so that the
    reference validation loss can read each document alone)."""
    entry = "{{data: text, files: '{}', sample_by: line, weight: {}, val_fraction: 0.2}}"
    return [*TINY, "data=mix", f"data.sources={{web: {entry.format(sources['web'], web)}, "
                               f"code: {entry.format(sources['code'], code)}}}",
            "data.packing=false", "trainer.max_steps=12", "trainer.eval_every=6",
            "optimizer=sgd", "optimizer.lr=0.5", "scheduler=constant", *more]


@pytest.mark.slow
def test_a_mixture_resumes_exactly_counts_each_source_and_validates_each(sources, tmp_path):
    whole = train(tmp_path / "whole", *mix_args(sources))
    train(tmp_path / "half", *mix_args(sources), "trainer.max_steps=6")
    resumed = train(tmp_path / "half", *mix_args(sources), "resume=" + str(tmp_path / "half"))
    assert_identical(final_weights(tmp_path / "half"), final_weights(tmp_path / "whole"))
    assert resumed["sources"] == whole["sources"]
    counts = whole["sources"]
    assert counts["web"]["sequences"] + counts["code"]["sequences"] == 12 * 4
    cfg = config(*mix_args(sources))
    parts = cfg.data.parts()
    for name, part in parts.items():
        n = min(8, len(data.load(part)["validation"]))
        # each source's val loss: its first 8 validation documents, read alone
        single = config(*TINY, "data=text", f"data.files={sources[name]}", "data.sample_by=line",
                        "data.packing=false", "data.val_fraction=0.2")
        step = sorted((tmp_path / "whole/checkpoints").glob("step-*"))[-1]
        expected = reference_val_loss(step / "model.safetensors", single, n)
        assert counts[name]["val_loss"] == pytest.approx(expected, rel=1e-5)
        assert scalars(tmp_path / "whole", f"val/{name}/loss")[-1][0] == 12
        epochs = scalars(tmp_path / "whole", f"data/{name}/epochs")[-1][1]
        assert epochs == pytest.approx(counts[name]["epochs"], rel=1e-4)
    assert counts["code"]["epochs"] > 1 > counts["web"]["epochs"]  # the small source repeats
    log = (tmp_path / "whole/train.log").read_text()
    assert "update 12/12: code val_loss" in log and "| web val_loss" in log and "epochs (" in log
    # new weights on resume: said in one line, each source going on from where it was
    more = train(tmp_path / "half", *mix_args(sources, 0, 1), "trainer.max_steps=14",
                 "resume=" + str(tmp_path / "half"))
    assert ("data.sources weights now web 0, code 1, the checkpoint's web 3, code 1: the draws "
            "after 48 follow") in (tmp_path / "half/train.log").read_text()
    assert more["sources"]["web"]["sequences"] == counts["web"]["sequences"]
    assert more["sources"]["code"]["sequences"] == counts["code"]["sequences"] + 2 * 4


@pytest.mark.slow
def test_two_processes_draw_the_mixture_as_one_and_resume_on_one(sources, tmp_path):
    one = cli(*mix_args(sources), "hydra.run.dir=one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = torchrun(*mix_args(sources), "data.batch_size=2", "trainer.max_steps=6",
                   "hydra.run.dir=two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    # resumed from its overrides.yaml, on one process, with a smaller validation set
    resumed = cli("resume=two", "trainer.max_steps=12", "data.batch_size=4",
                  "trainer.eval_sequences=4", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "validation now reads 6 sequences, the checkpoint's 10" in (
        tmp_path / "two/train.log").read_text()
    metrics = [json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two")]
    assert metrics[1]["sources"].keys() == metrics[0]["sources"].keys()
    for name, seen in metrics[0]["sources"].items():  # the same stream: the same draws
        assert metrics[1]["sources"][name]["sequences"] == seen["sequences"]
    assert max_relative_difference(final_weights(tmp_path / "two"),
                                   final_weights(tmp_path / "one")) < 1e-5
    # trainrun-eval reads the first N of each source, as the run's validation does
    proc = cli_eval("one", "--max-sequences", "8", "--json", cwd=tmp_path)
    scored = json.loads(proc.stdout)
    assert scored["loss"] == pytest.approx(metrics[0]["val_loss"], rel=1e-6)
    for name, seen in metrics[0]["sources"].items():
        assert scored["sources"][name] == pytest.approx(seen["val_loss"], rel=1e-6)


def cli_eval(*args: str, cwd: Path):
    exe = Path(sys.executable).with_name("trainrun-eval")
    proc = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_a_sweep_over_the_weights_runs_a_job_each(sources, tmp_path):
    proc = cli("-m", *mix_args(sources, 3, 1, "trainer.max_steps=2"),
               "data.sources.web.weight=1,3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (summary,) = tmp_path.glob("multirun/*/*/summary.csv")
    rows = summary.read_text().splitlines()
    assert len(rows) == 3 and all("data.sources.web.weight" in r for r in rows[1:])


@pytest.mark.parametrize("entry, key", [
    ("{web: {data: text, files: '{web}', weight: -1}}", "data.sources.web.weight"),
    ("{web: {data: text, files: '{web}', weight: abc}}", "data.sources.web.weight"),
    ("{web: {data: text, files: '{web}', weight: 0}, code: {data: text, files: '{code}', "
     "weight: 0}}", "data.sources"),
    ("{web: {data: parallel, files: '{web}'}}", "data.sources.web.data"),
    ("{web: {data: mix}}", "data.sources.web.data"),
    ("{web: {files: '{web}'}}", "data.sources.web.data"),
    ("{web: {data: text, files: '{web}', colour: red}}", "data.sources.web.colour"),
    ("{web: {data: text, files: '{web}', seq_len: 8}}", "data.sources.web.seq_len"),
    ("{web: {data: text, files: '{web}', document_mask: true}}",
     "data.sources.web.document_mask"),
    ("{web: {data: text}}", "data.sources.web.files"),
    ("{web: {data: text, files: '{web}', streaming: true}}", "data.sources.web.streaming"),
    ("{web: 3}", "data.sources.web"),
    ("[1, 2]", "data.sources"),
])
def test_bad_mixtures_name_the_key(sources, entry, key):
    value = entry.replace("{web}", str(sources["web"])).replace("{code}", str(sources["code"]))
    with pytest.raises(ConfigError) as err:
        config(*TINY, "data=mix", f"data.sources={value}")
    assert err.value.key == key, err.value


def test_an_entry_takes_new_keys_and_new_sources_without_a_plus(sources):
    cfg = config(*TINY, "data=mix", f"data.sources={{web: {{data: text, files: '{sources['web']}'}}}}",
                 "data.sources.web.weight=2", "data.sources.web.sample_by=paragraph",
                 f"data.sources.code={{data: text, files: '{sources['code']}'}}")
    assert cfg.data.weights() == {"web": 2.0, "code": 1.0}
    assert cfg.data.parts()["web"].sample_by == "paragraph"


def test_a_source_added_with_a_plus_is_refused_in_one_line(sources, tmp_path):
    proc = cli(*mix_args(sources), f"+data.sources.more={{data: text, files: '{sources['web']}'}}",
               "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("trainrun: error: data.sources.more: ")
    assert not (tmp_path / "run").exists()


def test_an_empty_micro_batch_of_a_mixture_is_empty():
    parts = {n: Sequences(np.arange(40, dtype=np.uint16), None, 4, True, 0) for n in "xy"}
    x, y = Mixture(parts).batch(np.array([], dtype=np.int64))
    assert x.shape == y.shape == (0, 4)


def test_bpe_is_trained_on_sources_of_other_string_types(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = [" ".join(f"w{i % 7} v{i % 5}" for i in range(j, j + 30)) for j in range(40)]
    pq.write_table(pa.table({"text": pa.array(text, pa.large_string())}), tmp_path / "a.parquet")
    (tmp_path / "b.txt").write_text("\n".join(text) + "\n")
    cfg = config(*TINY, "data=mix", f"data.sources={{a: {{data: text, files: '{tmp_path}/a.parquet'}}, "
                 f"b: {{data: text, files: '{tmp_path}/b.txt', sample_by: line}}}}",
                 "tokenizer=bpe", "tokenizer.vocab_size=300", "data.seq_len=8")
    loaded = data.load(cfg.data, cfg.tokenizer)
    assert loaded.train.names == ["a", "b"] and loaded.tokenizer.vocab_size > 257  # merges


def test_a_bad_weight_is_one_line_exit_2_and_writes_nothing(sources, tmp_path):
    proc = cli(*mix_args(sources, -2, 1), "hydra.run.dir=run", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "trainrun: error: data.sources.web.weight: got -2; allowed: a number >= 0"]
    assert not (tmp_path / "run").exists()
