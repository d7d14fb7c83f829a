"""The commands: every console script of pyproject.toml's [project.scripts] is a thin door
here, over the composition (trainrun.composition) and the builders the runner uses. Nothing
else in trainrun imports this package.

    train.py    trainrun (and `python -m trainrun`): train, or sweep with -m
    help.py     the text of `trainrun --help`
    lr.py       trainrun-lr: the learning-rate schedule a config produces (trainrun.lrpreview)
    lrfind.py   trainrun-lrfind: the learning-rate range test (trainrun.lrfind)
    sample.py   trainrun-sample: text from a run's checkpoint (trainrun.after.sample)
    eval.py     trainrun-eval: loss, perplexity, bits per byte (trainrun.after.evaluate)
    export.py   trainrun-export: a Hugging Face folder (trainrun.after.export)
    translate.py trainrun-translate: a translation run's beam search over a file (trainrun.translate)
    average.py  trainrun-average: the average of the last checkpoints (trainrun.after.average)
    launch.py   trainrun-nohup and trainrun-tmux: a run that outlives the SSH session
"""
