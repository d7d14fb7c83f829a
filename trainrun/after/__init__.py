"""After training: the commands that read a run directory (docs/after-training.md). Each is
a thin front door over the builders the runner uses; none writes into the run directory.

    run.py       a run directory as data: its config (the saved overrides, through the trust
                 boundary of trainrun.cli.overrides), its newest intact checkpoint or the one
                 asked for, the model with those weights, the tokenizer
    output.py    arguments whose errors are one line; messages rich on a terminal, plain
                 otherwise, on stderr (stdout carries the command's output)
    sample.py    trainrun-sample: generation with a KV cache, streamed
    evaluate.py  trainrun-eval: loss, perplexity, bits per byte
    export.py    trainrun-export: a Hugging Face folder of the model family's format, with
                 its tokenizer
"""
