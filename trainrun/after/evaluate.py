"""Loss, perplexity and bits per byte of a run's checkpoint on a data set, which
`trainrun-eval` reports (trainrun.commands.eval).

The data are the run's own (its saved data overrides) unless overridden (`data=text
data.files=...`, any data= source), built by the data code the run uses. Split `all`: every
document, none held out, each token a target once (data.Windows); `validation` or `train`:
that split's sequences. The sequences are read in order, in micro-batches of
data.batch_size, all of them or the first `max_sequences`, exactly as validation reads them
during training (trainrun.validation): the run's own validation split with max_sequences =
trainer.eval_sequences gives its val/loss.

    loss           = total / targets  (nats per target token; padding is not a target)
    perplexity     = exp(loss)
    bits_per_byte  = total / ln 2 / bytes

(for a translation run: loss and perplexity of the target tokens given their sources, and
sacreBLEU's BLEU and chrF of the translations against the targets, score_translation) where
total is the sum of -ln p(target) over the targets and bytes the number of UTF-8
bytes of the target tokens' text (an end-of-document target counts in the loss, with no
bytes), so that bits per byte compares models with different tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from trainrun import bleu, builders, data, translate
from trainrun.after.run import Run
from trainrun.validation import batches as micro_batches
from trainrun.validation import sequence_losses


def score(run: Run, split: str, max_sequences: int | None, max_batches: int | None,
          info: Callable[[str], None]) -> dict:
    """The figures of run's checkpoint on `split` (all, validation or train) of its data,
    over its first max_sequences sequences or max_batches micro-batches (None: all); `info`
    gets the line that says what is scored."""
    if split == "all":
        seqs = data.load_whole(run.cfg.data, run.tokenizer)
        documents = {"documents": len(seqs.seqs.offsets) - 1}
    else:
        seqs = data.load(run.cfg.data, run.cfg.tokenizer, tokenizer=run.tokenizer,
                         train=split == "train")[split]  # a stream's training rows unread
        documents = {}
    batch_size = run.cfg.data.batch_size
    n = available = len(seqs)
    if max_sequences is not None:
        n = min(n, max_sequences)
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    if isinstance(seqs, data.Mixture):  # the first n of each source, as the run validates
        seqs = seqs.heads({name: min(n, end - first) for name, (first, end) in
                           seqs.spans().items()})
        n = len(seqs)
    batches = micro_batches(n, batch_size)
    but = "" if run.cfg.data.packing else " but a document's first"
    each = " of each source" if isinstance(seqs, data.Mixture) else ""
    what = (f"{split} split: {n:,} of its {available:,} sequences{each} of {seqs.seq_len} "
            f"tokens"
            if split != "all" else
            f"all {documents['documents']:,} documents, none held out, each token{but} a "
            f"target once: {n:,} of {len(seqs):,} sequences of up to {seqs.seq_len} tokens")
    info(f"{run.checkpoint} (update {run.step}), {run.device}, {run.precision.mode}; "
         f"{what}, in {len(batches)} batch(es) of {batch_size}")
    losses = sequence_losses(run.model, seqs, batches, n, run.device, run.precision)
    total, targets = losses.sum(), seqs.num_targets(np.arange(n))
    sources = {} if not isinstance(seqs, data.Mixture) else {"sources": {
        name: (losses[first:end].sum() / seqs.num_targets(np.arange(first, end))).item()
        for name, (first, end) in seqs.spans().items()}}
    sizes = run.tokenizer.token_bytes()
    n_bytes = 0
    for idx in batches:
        y = seqs.batch(idx)[1].numpy()
        n_bytes += int(sizes[y[y != data.IGNORE]].sum())
    loss = (total / targets).item()  # as the run's validation computes it
    nats = total.item()
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / n_bytes if n_bytes else math.nan,
            "sequences": n, "tokens": targets, "bytes": n_bytes, "batches": len(batches),
            "split": split, **documents, **sources, "checkpoint": str(run.checkpoint), "step": run.step}


def score_translation(run: Run, split: str, max_sequences: int | None,
                      search: translate.Search, info: Callable[[str], None]) -> dict:
    """Loss, perplexity, BLEU and chrF of a translation run's checkpoint on `split`
    (validation, test or train) of its data, over its first max_sequences pairs (None: all).

    BLEU and chrF are sacreBLEU's over every pair of the split as the files have them (an
    empty source line translated as an empty line, a source longer than the model's
    positions cut to them), translated by `search` as trainrun-translate translates: the
    figure sacreBLEU's command line gives for trainrun-translate's output and the target
    file. The loss is validation's (the plain negative log-likelihood of the target tokens)
    over the first max_sequences pairs that training reads: those with both sides, within
    the length limits (load_pairs says how many it dropped)."""
    test = split == "test"
    loaded = data.load_pairs(run.cfg.data, run.cfg.tokenizer, info, tokenizer=run.tokenizer,
                             seed=run.cfg.trainer.seed, with_test=test)
    pairs = {"validation": loaded.validation, "test": loaded.test,
             "train": loaded.train.pairs}[split]
    lines = run.cfg.data.pairs(with_test=test, keep_empty=True)[0][split]
    n = len(lines) if max_sequences is None else min(len(lines), max_sequences)
    lines = lines.select(range(n))
    kept = len(pairs) if max_sequences is None else min(len(pairs), max_sequences)
    batches = micro_batches(kept, builders.eval_batch_size(run.cfg))  # as validation reads
    how = "greedy" if search.beam == 1 else (f"beam {search.beam}, length penalty "
                                             f"{search.length_penalty:g}")
    info(f"{run.checkpoint} (update {run.step}), {run.device}, {run.precision.mode}; {split} "
         f"split: BLEU and chrF of {n:,} pairs as the files have them, the loss over {kept:,} "
         f"pairs as training reads them; translations: {how}")
    total = sequence_losses(run.model, pairs, batches, kept, run.device, run.precision).sum()
    targets = pairs.num_targets(np.arange(kept))
    loss = (total / targets).item()
    hypotheses, done = translate.translate_lines(run.model, run.tokenizer, lines["source"],
                                                 search, run.precision.autocast)
    if done.cut:
        info(f"{done.cut} source sentence(s) longer than the model's "
             f"{run.cfg.model.max_seq_len} positions were cut to them")
    scores = bleu.score(hypotheses, [r.rstrip() for r in lines["target"]])
    return {"loss": loss, "perplexity": math.exp(loss), "bleu": scores.bleu,
            "chrf": scores.chrf, "bleu_signature": scores.bleu_signature,
            "chrf_signature": scores.chrf_signature, "sentences": n, "loss_pairs": kept,
            "tokens": targets, "split": split, "beam": search.beam,
            "length_penalty": search.length_penalty, "checkpoint": str(run.checkpoint),
            "step": run.step}
