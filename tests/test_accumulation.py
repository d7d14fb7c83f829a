"""Accumulation (docs/design.md, Updates): k micro-batches of b sequences give the same
update as one batch of k·b, on padded documents of very different lengths, including the
shorter last window of an epoch — because the loss is normalized by all target tokens of the
update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import config, make_corpus, tiny, train, weights

from trainrun import data
from trainrun.data import IGNORE
from trainrun.data.order import DataOrder, micro_batches
from trainrun.data.tokenizers import ByteTokenizer
from trainrun.models import GPT

SHAPES = [(8, 1), (4, 2), (2, 4)]  # (batch_size, grad_accum_steps): 8 sequences per update


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


@pytest.fixture(scope="module")
def padded_corpus(tmp_path_factory):
    # 60 documents of 1 to 60 words: about 57 training sequences, so an epoch ends with a
    # window of fewer than 8 sequences within the 10 updates below.
    return make_corpus(tmp_path_factory.mktemp("acc") / "docs.txt", n_docs=60, seed=3)


def overrides(corpus, batch_size: int, accum: int) -> list[str]:
    # SGD: the weights move linearly with the gradient, so the comparison measures the
    # accumulated gradient itself. (Adam divides by sqrt(v): float rounding in gradients
    # that are nearly zero becomes an lr-sized step, ~1e-4 apart after 10 updates whatever
    # the accumulation.)
    return tiny(corpus, "data.packing=false", f"data.batch_size={batch_size}",
                f"trainer.grad_accum_steps={accum}", "trainer.max_steps=10",
                "trainer.eval_every=100", "model.dropout=0.0", "scheduler=constant",
                "optimizer=sgd", "optimizer.lr=0.5")


@pytest.mark.parametrize("tokenizer", [[], ["tokenizer=bpe", "tokenizer.vocab_size=320"]],
                         ids=["byte", "bpe"])
def test_accumulation_equals_one_big_batch(tmp_path, padded_corpus, tokenizer):
    final = {}
    for batch_size, accum in SHAPES:
        run_dir = tmp_path / f"{batch_size}x{accum}"
        summary = train(run_dir, *overrides(padded_corpus, batch_size, accum), *tokenizer)
        assert summary["steps"] == 10
        final[(batch_size, accum)] = weights(run_dir / "checkpoints/step-00000010/model.safetensors")
    big = final[(8, 1)]
    for shape in SHAPES[1:]:
        assert max_relative_difference(final[shape], big) < 1e-5, shape


def test_the_windows_really_differ_in_length_and_cross_an_epoch(padded_corpus):
    """The data of the test above has what makes per-micro-batch means wrong."""
    cfg = config(*overrides(padded_corpus, 2, 4))
    train_seqs = data.load(cfg.data)["train"]
    order = DataOrder(len(train_seqs), cfg.trainer.seed)
    windows = [order.next_window(8) for _ in range(10)]
    assert min(len(w) for w in windows) < 8  # an epoch ended inside the run
    counts = [train_seqs.num_targets(mb) for mb in micro_batches(windows[0], 2)]
    assert max(counts) > 3 * min(counts)


def test_mean_of_micro_batch_means_would_fail_the_threshold(padded_corpus):
    """A bare PyTorch reference: averaging per-micro-batch means gives a gradient far from
    the one-big-batch gradient on these documents, so the 1e-5 threshold above can fail."""
    cfg = config(*overrides(padded_corpus, 2, 4))
    seqs = data.load(cfg.data)["train"]
    window = DataOrder(len(seqs), cfg.trainer.seed).next_window(8)
    torch.manual_seed(0)
    model = GPT(cfg.model, ByteTokenizer.vocab_size)

    def grads(loss_fn) -> torch.Tensor:
        model.zero_grad()
        loss_fn().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    def token_loss(ix, reduction):
        x, y = seqs.batch(ix)
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                               reduction=reduction)

    big = grads(lambda: token_loss(window, "mean"))
    parts = micro_batches(window, 2)
    mean_of_means = grads(lambda: sum(token_loss(ix, "mean") for ix in parts) / len(parts))
    token_sum = grads(lambda: sum(token_loss(ix, "sum") for ix in parts)
                      / seqs.num_targets(window))
    relative = lambda g: ((g - big).abs().max() / big.abs().max()).item()  # noqa: E731
    assert relative(token_sum) < 1e-5
    assert relative(mean_of_means) > 1e-2
    assert np.isfinite(relative(mean_of_means))
