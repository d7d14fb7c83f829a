"""Which jobs of a sweep are identical (trainrun/identical.py): two options of a group are
never identical unless they train the same run, checked on every pair of options of every
group against a real criterion (a schedule's lr at every update; otherwise the weights two
short runs end with, bit for bit); the keys that chosen options ignore still make jobs
identical."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json

import pytest
from helpers import REPO, TINY, assert_identical, config, final_weights, make_pairs, tiny

from trainrun import identical, runner
from trainrun.composition.init_from import option_family
from trainrun.config import Config, validate
from trainrun.errors import ConfigError
from trainrun.schedules import build_schedule

CONF = REPO / "conf"
# every conf/<group>/, found on disk, so that groups and options added later are covered;
# Hydra's own presets (hydra/, hparams_search/) are not a run's options
GROUPS = sorted(p.name for p in CONF.iterdir()
                if p.is_dir() and p.name not in ("hydra", "hparams_search", "__pycache__"))
N = 60  # updates: a short run whose every update's rate is compared


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus) -> dict[tuple[str, str], list[str]]:
    """The overrides an option needs besides its name (files it reads)."""
    from trainrun.data.tokenizers import ByteTokenizer

    root = tmp_path_factory.mktemp("inputs")
    (root / "ds").mkdir()
    for split in ("train", "validation"):
        (root / "ds" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": f"{split} document {i}"}) + "\n" for i in range(20)))
    ByteTokenizer().hf().save(str(root / "tokenizer.json"))
    pairs = make_pairs(root / "pairs", n=60)
    return {"pairs": [f"data.source_files={pairs / 'train.src'}",
                      f"data.target_files={pairs / 'train.tgt'}"],
            ("data", "text"): [f"data.files={corpus}"],
            ("data", "mix"): [f"data.sources={{a: {{data: text, files: '{corpus}'}}}}"],
            ("data", "hf"): [f"data.path={root / 'ds'}", "data.val_split=validation"],
            ("tokenizer", "hf"): [f"tokenizer.path={root / 'tokenizer.json'}"],
            ("scheduler", "multistep"): ["scheduler.milestones=[10,20]"],  # within N updates
            ("model", "smollm_135m"): ["model.n_kv_heads=1"]}  # of tiny()'s 2 heads


def base(group: str, corpus, option: str, inputs: dict) -> list[str]:
    """The run every option of `group` is tried in: tiny, on the test corpus unless the data
    group is compared; a constant schedule when optimizers are (schedulefree takes no other);
    an encoder-decoder and sentence pairs together (they train on nothing else)."""
    if (group, option) == ("data", "parallel") or (
            group == "model" and option_family(option, None) == "seq2seq"):
        pair = [o for o in ("model=transformer_tiny", "data=parallel")
                if not o.startswith(f"{group}=")]  # the option compared is chosen after
        return [*pair, *inputs["pairs"], "data.seq_len=32", "data.batch_size=4",
                "model.d_model=32", "model.n_heads=2", "model.d_ff=64",
                "model.n_encoder_layers=1", "model.n_decoder_layers=1", "model.max_seq_len=64",
                f"trainer.max_steps={N}", "trainer.eval_sequences=8", "trainer.device=cpu",
                "precision=fp32"]
    if group == "data":
        return [*TINY, f"trainer.max_steps={N}"]
    return tiny(corpus, f"trainer.max_steps={N}", *(["scheduler=constant"]
                                                      if group == "optimizer" else []))


def aligned(a: Config, b: Config, group: str) -> Config:
    """b, with every key that its option shares with a's option given a's value wherever b's
    option takes it: two options that differ by their choice alone, where the keys allow."""
    out = copy.deepcopy(b)
    ours, theirs = getattr(out, group), getattr(a, group)
    shared = {f.name for f in dataclasses.fields(theirs)} & {f.name for f in dataclasses.fields(ours)}
    for name in sorted(shared):
        before, value = getattr(ours, name), getattr(theirs, name)
        if isinstance(before, list) != isinstance(value, list):  # a type composition refuses
            continue
        setattr(ours, name, copy.deepcopy(value))
        try:
            validate(out)
        except ConfigError:
            setattr(ours, name, before)
    return out


def mode(cfg: Config) -> str:
    """The precision the run trains in on this machine, as `trainrun` finds it."""
    return runner.device_and_precision(cfg)[1].mode


def curve(cfg: Config) -> list[float]:
    schedule = build_schedule(cfg.scheduler, cfg.optimizer.lr, cfg.trainer.max_steps,
                              cfg.model.d_model)
    return [schedule(k) for k in range(1, cfg.trainer.max_steps + 1)]


def trained(cfg: Config, run_dir) -> dict:
    """The weights a 3-update run of cfg ends with."""
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_steps=3,
                                                               eval_every=3))
    runner.run_training(cfg, run_dir, "", {})
    return final_weights(run_dir)


def test_two_options_of_a_group_are_identical_only_when_they_train_the_same_run(
        corpus, inputs, tmp_path):
    """Every pair of options of every group, with the keys they share given the same values."""
    wrong, checked = [], []
    for group in GROUPS:
        names = options(group)
        configs = {o: config(*base(group, corpus, o, inputs), f"{group}={o}",
                             *inputs.get((group, o), [])) for o in names}
        for a, b in itertools.combinations(names, 2):
            first, second = configs[a], aligned(configs[a], configs[b], group)
            jobs = [[f"{group}={a}"], [f"{group}={b}"]]
            repeats = identical.find(jobs, [first, second], [mode(first), mode(second)])
            if group == "scheduler":  # the criterion: the rate of every update
                if curve(first) != curve(second):
                    checked.append(f"{group}={a},{b}")
                    if repeats:
                        wrong.append(f"{group}={a},{b}: other lr curves, declared identical")
                # the same curve over this short run (a step_size longer than it): kept apart
                # all the same, as over a longer run they differ
            elif repeats:  # the criterion: the weights two short runs end with
                assert_identical(trained(first, tmp_path / f"{group}-{a}-{b}-a"),
                                 trained(second, tmp_path / f"{group}-{a}-{b}-b"))
            else:
                checked.append(f"{group}={a},{b}")
    assert wrong == []
    # e.g. the same keys (warmup_steps, warmup_ratio, min_lr) and other curves; the same keys
    # and values, and other updates
    assert {"scheduler=cosine,linear", "optimizer=adam,adamw", "clip=none,norm"} <= set(checked)


def test_precision_auto_on_a_cpu_is_the_fp32_run(corpus, tmp_path):
    """The one exception between options on a CPU: auto trains in fp32 there, so the two jobs
    are identical, and their runs end with the same weights."""
    jobs = [tiny(corpus, "precision=fp32"), tiny(corpus, "precision=auto")]
    configs = [config(*job) for job in jobs]
    assert [mode(c) for c in configs] == ["fp32", "fp32"]
    assert identical.find(jobs, configs, ["fp32", "fp32"]) == {
        1: (0, "precision=auto: the same fp32 run on this machine")}
    assert_identical(trained(configs[0], tmp_path / "fp32"), trained(configs[1], tmp_path / "auto"))


def test_keys_the_chosen_options_ignore_make_jobs_identical_and_nothing_else_does(corpus):
    cases = [  # (the options, the two values swept, identical?)
        # noam sets every update's rate itself: optimizer.lr is not used
        (["scheduler=noam"], ["optimizer.lr=0.001", "optimizer.lr=0.002"], True),
        (["scheduler=cosine"], ["optimizer.lr=0.001", "optimizer.lr=0.002"], False),
        # the loss scaler's keys outside fp16 (auto on a CPU trains in fp32)
        (["precision=auto"], ["precision.init_scale=1024", "precision.init_scale=2048"], True),
        (["precision=auto"], ["precision.growth_interval=10", "precision.growth_interval=20"],
         True),
        (["precision=fp16"], ["precision.init_scale=1024", "precision.init_scale=2048"], False),
        # options with the same keys and values
        (["scheduler.warmup_ratio=0.1"], ["scheduler=cosine", "scheduler=linear"], False),
        (["optimizer.weight_decay=0.1", "optimizer.betas=[0.9,0.95]"],
         ["optimizer=adamw", "optimizer=adam"], False),
    ]
    for overrides, values, same in cases:
        jobs = [tiny(corpus, *overrides, value) for value in values]
        configs = [config(*job) for job in jobs]
        repeats = identical.find(jobs, configs, [mode(c) for c in configs])
        expected = {1: (0, f"{values[1]}: not used by the options chosen")} if same else {}
        assert repeats == expected, values
