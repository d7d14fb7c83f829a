"""Data (docs/data.md): byte-level tokens, packing and padding, the sources (built-in, local
files, `datasets.load_dataset`), the `datasets` cache, and the order in which sequences are
seen, which depends on trainer.seed alone."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from helpers import config

from trainrun import data
from trainrun.data import IGNORE, storage
from trainrun.data.order import DataOrder, micro_batches
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.errors import ConfigError
from trainrun.models import GPT, GPTConfig
from trainrun.update import loss_sum

TEXTS = [
    "plain ASCII text",
    "héllo wörld — naïve café",
    "日本語のテキスト",
    "emoji 🙂🚀 and a tab\tinside",
    'quotes "like this", commas, and a backslash \\',
    "x",
    "a much longer document that will not fit into one short sequence of sixteen bytes",
]


def token_ids(text: str) -> list[int]:
    """The reference tokenization: Python's own UTF-8 bytes, then end of document."""
    return [*text.encode("utf-8"), EOT]


EOT, VOCAB_SIZE = ByteTokenizer.eot, ByteTokenizer.vocab_size


def stream(texts) -> list[int]:
    return [i for t in texts if t.strip() for i in token_ids(t)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    """A local data set in the layout `datasets.load_dataset(folder)` understands."""
    folder = tmp_path / "local_ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"id": i, "body": t} for i, t in enumerate(TEXTS)])
    write_jsonl(folder / "validation.jsonl",
                [{"id": 100 + i, "body": t} for i, t in enumerate(["valid one", "валидация два"])])
    return folder


def hf(folder: Path, *overrides: str) -> data.DataConfig:
    return config("data=hf", f"data.path={folder}", "data.val_split=validation",
                  "data.text_column=body", *overrides).data


# -- tokens --------------------------------------------------------------------------


def byte_token_file(tmp_path, texts) -> tuple[np.ndarray, np.ndarray]:
    import datasets

    (tmp_path / "tokens").mkdir()
    docs = datasets.Dataset.from_dict({"text": texts})
    record = storage.write_split(docs, ByteTokenizer(), tmp_path / "tokens", "train",
                                 lambda line: None)
    (tmp_path / "tokens" / "info.json").write_text(json.dumps(
        {"dtype": "uint16", "vocab_size": ByteTokenizer.vocab_size, "splits": {"train": record}}))
    return storage.open_split(tmp_path / "tokens", "train")


def test_byte_tokens_are_utf8_bytes_then_eot_and_decode_back(tmp_path):
    tokens, offsets = byte_token_file(tmp_path, TEXTS)
    assert tokens.dtype == np.uint16 and tokens.tolist() == stream(TEXTS)
    assert np.diff(offsets).tolist() == [len(token_ids(t)) for t in TEXTS]
    for text, start, end in zip(TEXTS, offsets[:-1], offsets[1:], strict=True):
        step = ByteTokenizer().streamer()
        assert "".join(step(int(i)) for i in tokens[start:end]) == text


def test_empty_documents_are_dropped(tmp_path):
    tokens, offsets = byte_token_file(tmp_path, ["a", "", "  \n", None, "b"])
    assert tokens.tolist() == [97, EOT, 98, EOT] and offsets.tolist() == [0, 2, 4]


# -- packing and padding -------------------------------------------------------------


def all_rows(seqs: data.Sequences) -> tuple[torch.Tensor, torch.Tensor]:
    return seqs.batch(np.arange(len(seqs)))


def test_packed_windows_are_the_token_stream_cut_in_seq_len(hf_folder):
    T = 16
    splits = data.load(hf(hf_folder, f"data.seq_len={T}"))
    for split, texts in (("train", TEXTS), ("validation", ["valid one", "валидация два"])):
        expected = torch.tensor(stream(texts))
        seqs = splits[split]
        n = (len(expected) - 1) // T
        assert len(seqs) == n > 0
        x, y = all_rows(seqs)
        assert x.shape == y.shape == (n, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x.flatten(), expected[: n * T])
        assert torch.equal(y.flatten(), expected[1 : n * T + 1])  # targets: inputs shifted by one
        assert seqs.num_targets(np.arange(n)) == n * T
    # any subset, in the order asked for
    x, y = splits["train"].batch(np.array([3, 0]))
    full = torch.tensor(stream(TEXTS))
    assert torch.equal(x[0], full[3 * T : 4 * T]) and torch.equal(x[1], full[:T])
    assert torch.equal(y[0], full[3 * T + 1 : 4 * T + 1])


def test_without_packing_one_document_per_sequence_padding_ignored(hf_folder):
    T = 12
    seqs = data.load(hf(hf_folder, f"data.seq_len={T}", "data.packing=false"))["train"]
    assert len(seqs) == len(TEXTS)
    x, y = all_rows(seqs)
    assert x.shape == y.shape == (len(TEXTS), T)
    n_real = []
    for row, text in enumerate(TEXTS):
        ids = token_ids(text)[: T + 1]  # longer documents are truncated
        n = len(ids) - 1
        n_real.append(n)
        assert x[row, :n].tolist() == ids[:-1]
        assert y[row, :n].tolist() == ids[1:]
        assert (y[row, n:] == IGNORE).all()
    assert n_real[-1] == T and n_real[5] == 1  # the long document; "x" has one target
    assert seqs.num_targets(np.arange(len(TEXTS))) == sum(n_real) == int((y != IGNORE).sum())
    assert seqs.num_targets(np.array([5, 0])) == n_real[5] + n_real[0]

    # padding is excluded from the loss: the padded batch's loss is the sum of each
    # document's loss computed alone, unpadded
    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0,
                            max_seq_len=T), VOCAB_SIZE).eval()
    with torch.no_grad():
        alone = sum(
            F.cross_entropy(model(x[r : r + 1, :n])[0], y[r, :n], reduction="sum")
            for r, n in enumerate(n_real)
        )
        torch.testing.assert_close(loss_sum(model, (x, y)), alone, rtol=1e-5, atol=1e-4)


# -- sources -------------------------------------------------------------------------


def write_table(folder: Path, ext: str, texts: list[str]) -> Path:
    folder.mkdir()
    path = folder / f"docs.{ext}"
    frame = pd.DataFrame({"id": range(len(texts)), "body": texts})
    if ext == "txt":
        path.write_text("\n".join(texts[:3]) + "\n\n" + "\n".join(texts[3:]) + "\n", "utf-8")
    elif ext == "jsonl":
        write_jsonl(path, frame.to_dict("records"))
    elif ext == "csv":
        frame.to_csv(path, index=False)
    elif ext == "parquet":
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return path


@pytest.mark.parametrize("ext", ["txt", "jsonl", "csv", "parquet"])
def test_local_files_by_extension(tmp_path, ext):
    texts = [f"{t} #{i}" for i in range(4) for t in TEXTS]  # 28 distinct documents
    path = write_table(tmp_path / ext, ext, texts)
    column = ["data.sample_by=line"] if ext == "txt" else ["data.text_column=body"]
    cfg = config("data=text", f"data.files={tmp_path / ext}/*.{ext}", *column,
                 "data.val_fraction=0.25", "data.seq_len=16").data
    assert cfg.paths() == [str(path)]
    docs = cfg.documents()
    train, val = list(docs["train"]["text"]), list(docs["validation"]["text"])
    # each line (txt) or row is one document; the blank line of the .txt is no document
    assert sorted(t for t in train + val if t.strip()) == sorted(texts)
    assert len(val) == round(0.25 * (len(texts) + (ext == "txt")))
    tokens = data.load(cfg)
    x, y = all_rows(tokens["train"])
    expected = torch.tensor(stream(train))
    assert torch.equal(x.flatten(), expected[: x.numel()])
    assert torch.equal(y[-1, -1], expected[x.numel()])


def test_local_files_from_several_patterns_and_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.txt").write_text("first\nsecond\n")
    (tmp_path / "a" / "two.txt").write_text("third\n")
    (tmp_path / "a" / "skip.md").write_text("not matched\n")
    cfg = config("data=text", f"data.files={tmp_path}/a/*.txt", "data.sample_by=line").data
    assert cfg.paths() == [str(tmp_path / "a" / "one.txt"), str(tmp_path / "a" / "two.txt")]
    docs = cfg.documents()
    assert sorted(list(docs["train"]["text"]) + list(docs["validation"]["text"])) == ["first", "second", "third"]


def test_local_files_with_a_missing_text_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": t} for t in TEXTS])
    cfg = config("data=text", f"data.files={path}", "data.text_column=content").data
    with pytest.raises(ConfigError) as err:
        cfg.documents()
    assert err.value.key == "data.text_column" and "body" in err.value.message


def test_hf_maps_onto_load_dataset(hf_folder):
    docs = hf(hf_folder).documents()
    reference = datasets.load_dataset(str(hf_folder))  # the same call a user would make
    assert list(docs["train"]["text"]) == list(reference["train"]["body"]) == TEXTS
    assert list(docs["validation"]["text"]) == list(reference["validation"]["body"])
    assert list(docs["validation"]["text"]) == ["valid one", "валидация два"]

    # without val_split: the folder's own validation split when it has one ...
    own = config("data=hf", f"data.path={hf_folder}", "data.text_column=body").data.documents()
    assert list(own["train"]["text"]) == TEXTS
    assert list(own["validation"]["text"]) == list(reference["validation"]["body"])
    # ... else val_fraction of the train split is held out
    (hf_folder / "validation.jsonl").unlink()
    held = config("data=hf", f"data.path={hf_folder}", "data.text_column=body",
                  "data.val_fraction=0.3").data.documents()
    assert len(held["validation"]) == round(0.3 * len(TEXTS))
    assert sorted(list(held["train"]["text"]) + list(held["validation"]["text"])) == sorted(TEXTS)


@pytest.mark.parametrize("override,key", [
    ("data.val_split=test", "data.val_split"),
    ("data.train_split=nope", "data.train_split"),
])
def test_hf_unknown_split_is_a_config_error(hf_folder, override, key):
    with pytest.raises(ConfigError) as err:
        hf(hf_folder, override).documents()
    assert err.value.key == key and "validation" in err.value.message


def test_hf_path_that_does_not_exist_is_a_config_error(tmp_path):
    cfg = config("data=hf", f"data.path={tmp_path}/missing", "data.val_split=validation").data
    with pytest.raises(ConfigError) as err:
        cfg.documents()
    assert err.value.key == "data.path" and "missing" in err.value.message


def test_builtin_is_the_standard_library_with_a_fixed_split():
    """Offline (conftest sets HF_DATASETS_OFFLINE); the split depends on no seed."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    first = config("trainer.seed=1").data.documents()
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    second = config("trainer.seed=2").data.documents()
    assert list(first["validation"]["text"]) == list(second["validation"]["text"])
    assert list(first["train"]["text"]) == list(second["train"]["text"])

    sources = {p.read_text("utf-8") for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py")}
    val, train = list(first["validation"]["text"]), list(first["train"]["text"])
    assert set(val) <= sources and set(train) <= sources
    assert not set(val) & set(train)
    assert len(val) == max(1, round(0.05 * (len(val) + len(train))))
    assert len(train) > 100

    splits = data.load(config().data)
    assert len(splits["train"]) > 1000 and len(splits["validation"]) > 10


def cache_listing(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_tokens_are_read_back_from_the_token_cache(hf_folder, tmp_path, monkeypatch):
    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    cfg = hf(hf_folder, "data.seq_len=8")

    first = data.load(cfg)
    folder = Path(first.train.tokens.filename).parent
    assert folder.is_relative_to(cache / "trainrun" / "tokens")
    assert isinstance(first.train.tokens, np.memmap) and not first.train.tokens.flags.writeable
    listing = cache_listing(cache)

    second = data.load(cfg)
    assert Path(second.train.tokens.filename).parent == folder
    assert cache_listing(cache) == listing  # nothing written again, nothing new

    # the control: other documents are tokenized anew, into a new cache folder
    write_jsonl(hf_folder / "train.jsonl",
                [{"id": i, "body": t} for i, t in enumerate([*TEXTS, "one more document"])])
    third = data.load(cfg)
    assert Path(third.train.tokens.filename).parent != folder
    assert set(cache_listing(cache)) > set(listing)


# -- order (docs/design.md, Data) ---------------------------------------------------


def seen(n: int, seed: int, batch_size: int, accum: int, world_size: int = 1,
         updates: int = 30, order: DataOrder | None = None):
    """What a run sees: the indices of its micro-batches, update after update, all ranks'
    shares of a window in rank order; and the window sizes."""
    order = order or DataOrder(n, seed)
    indices, windows = [], []
    for _ in range(updates):
        window = order.next_window(batch_size * accum * world_size)
        parts = [micro_batches(window, batch_size, r, world_size) for r in range(world_size)]
        assert len({len(p) for p in parts}) == 1  # every rank runs as many micro-batches
        flat = [i for p in parts for mb in p for i in mb.tolist()]
        assert flat == window.tolist()
        indices += flat
        windows.append(len(window))
    return indices, windows


N = 21  # sequences: no window size below divides it


def test_order_does_not_depend_on_batch_size_accumulation_or_processes():
    reference, windows = seen(N, 1337, batch_size=1, accum=8)
    assert windows[:6] == [8, 8, 5, 8, 8, 5]  # an epoch's last window is shorter
    for bs, accum, ws in [(2, 4, 1), (4, 2, 1), (8, 1, 1), (3, 1, 1), (5, 2, 1), (1, 1, 1),
                          (2, 2, 2), (1, 2, 4), (3, 3, 2)]:
        indices, _ = seen(N, 1337, bs, accum, ws, updates=200)
        common = min(len(indices), len(reference))
        assert common >= 3 * N
        assert indices[:common] == reference[:common], (bs, accum, ws)


def test_each_epoch_is_a_new_seeded_permutation():
    indices, _ = seen(N, 1337, 4, 2, updates=40)
    epochs = [indices[e * N : (e + 1) * N] for e in range(4)]
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4
    assert epochs[0] != list(range(N))  # shuffled
    again, _ = seen(N, 1337, 4, 2, updates=40)
    other, _ = seen(N, 1338, 4, 2, updates=40)
    assert again == indices and other != indices
    # NumPy's own permutation of n, as the order has always been (4-byte ids change nothing)
    assert epochs == [np.random.default_rng([1337, e]).permutation(N).tolist() for e in range(4)]


def test_order_state_dict_continues_the_stream():
    order = DataOrder(N, 7)
    seen(N, 7, 4, 2, updates=4, order=order)  # into the second epoch
    state = json.loads(json.dumps(order.state_dict()))
    rest, _ = seen(N, 7, 4, 2, updates=9, order=order)

    resumed = DataOrder(N, 7)
    resumed.load_state_dict(state)
    again, _ = seen(N, 7, 4, 2, updates=9, order=resumed)
    assert again == rest
    resumed = DataOrder(N, 7)
    resumed.load_state_dict(state)  # a resumed run may change the batch size
    other, _ = seen(N, 7, 3, 1, updates=30, order=resumed)
    assert other[: len(rest)] == rest
    whole, _ = seen(N, 7, 4, 2, updates=13)
    assert whole[-len(rest):] == rest

    with pytest.raises(ConfigError) as err:
        DataOrder(N, 8).load_state_dict(state)
    assert err.value.key == "trainer.seed"
    with pytest.raises(ConfigError) as err:
        DataOrder(N + 1, 7).load_state_dict(state)
    assert err.value.key == "data"


def test_micro_batches_cut_a_window_and_share_it_across_ranks():
    window = np.arange(100, 116)
    assert [m.tolist() for m in micro_batches(window, 3)] == [
        [100, 101, 102], [103, 104, 105], [106, 107, 108], [109, 110, 111], [112, 113, 114],
        [115]]
    assert [m.tolist() for m in micro_batches(window, 4, rank=1, world_size=2)] == [
        [108, 109, 110, 111], [112, 113, 114, 115]]
    assert [m.tolist() for m in micro_batches(window, 2, rank=3, world_size=4)] == [
        [112, 113], [114, 115]]

    for ws in (1, 2, 3, 4):
        for bs in (1, 2, 3):
            for accum in (1, 2, 3):
                full = bs * accum * ws
                for length in range(full + 1):  # full windows and an epoch's short ends
                    w = np.arange(length) + 1000
                    parts = [micro_batches(w, bs, r, ws) for r in range(ws)]
                    sizes = [sum(len(m) for m in p) for p in parts]
                    assert max(sizes) - min(sizes) <= 1
                    assert len({len(p) for p in parts}) == 1
                    assert all(len(m) <= bs for p in parts for m in p)
                    assert np.concatenate([m for p in parts for m in p] + [w[:0]]).tolist() \
                        == w.tolist()
                    if length == full:
                        assert all(len(p) == accum and all(len(m) == bs for m in p)
                                   for p in parts)
                    if ws == 1:
                        assert all(len(m) > 0 for m in parts[0])


def test_an_empty_micro_batch_is_a_valid_batch(hf_folder):
    """At the short end of an epoch, a rank may get a micro-batch of no sequence."""
    for packing in ("true", "false"):
        seqs = data.load(hf(hf_folder, "data.seq_len=8", f"data.packing={packing}"))["train"]
        x, y = seqs.batch(np.array([], dtype=np.int64))
        assert x.shape == y.shape == (0, 8)
        assert seqs.num_targets(np.array([], dtype=np.int64)) == 0
    model = GPT(GPTConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0,
                            max_seq_len=8), VOCAB_SIZE)
    loss = loss_sum(model, (x, y))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
