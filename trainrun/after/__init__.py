"""After training: what the commands that read a run directory (docs/after-training.md)
compute, over the builders the runner uses; their doors are trainrun.commands.sample, .eval,
.export and .average. Only average.py writes into the run directory: a checkpoint beside
the run's own, under the run directory's lock.

    run.py       a run directory as data: its config (the saved overrides, through the trust
                 boundary of trainrun.composition.overrides), its newest intact checkpoint or
                 the one asked for, the model with those weights, the tokenizer
    output.py    arguments whose errors are one line; messages rich on a terminal, plain
                 otherwise, on stderr (stdout carries the command's output)
    sample.py    generation with a KV cache
    evaluate.py  loss, perplexity, bits per byte
    export.py    a Hugging Face folder of the model family's format, with its tokenizer
    average.py   the mean of the last checkpoints' weights, as a checkpoint of the run
"""
