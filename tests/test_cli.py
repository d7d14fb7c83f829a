"""The command line: "one of these keys" pairs, `trainrun --help`, quoting of paths in
overrides, and what a resume may take from a run directory's saved overrides."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess

import pytest
import yaml
from helpers import cli, config, tiny
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from trainrun.clip import CLIPPERS
from trainrun.composition import arguments
from trainrun.composition.overrides import continue_run, groups, one_of, options, saved
from trainrun.config import option_name
from trainrun.errors import ConfigError
from trainrun.resume import command, quote
from trainrun.schedules import SCHEDULES

# a valid value for each key that appears in a pair, on a run of 100 updates
VALUES = {"warmup_steps": "5", "warmup_ratio": "0.1", "decay_steps": "20", "decay_ratio": "0.2",
          "gamma": "0.9", "decay_rate": "0.5"}
PAIRS = [(option, side, other) for option, schema in SCHEDULES.items()
         for pair in schema.one_of for side, other in (pair, pair[::-1])]


def composed(argv: list[str]):
    """The scheduler section `trainrun argv` composes, before validation."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="trainrun.conf", version_base=None):
        return compose(config_name="config", overrides=arguments(argv)).scheduler


@pytest.mark.parametrize("option,side,other", PAIRS,
                         ids=[f"{o}-{'+'.join(s)}" for o, s, _ in PAIRS])
def test_naming_one_side_of_a_pair_nulls_the_other(option, side, other):
    argv = [f"scheduler={option}", "trainer.max_steps=1000",
            *(f"scheduler.{k}={VALUES[k]}" for k in side)]
    section = composed(argv)
    for k in side:
        assert float(section[k]) == float(VALUES[k])
    for k in other:
        assert section[k] is None, k
    if option != "onecycle":  # onecycle's warmup keys are an error by design
        cfg = config(*arguments(argv))
        assert all(getattr(cfg.scheduler, k) is None for k in other)


@pytest.mark.parametrize("option,side,other", PAIRS,
                         ids=[f"{o}-{'+'.join(s)}" for o, s, _ in PAIRS])
def test_naming_both_sides_on_one_command_line_stays_an_error(option, side, other):
    argv = [f"scheduler={option}", "trainer.max_steps=1000",
            *(f"scheduler.{k}={VALUES[k]}" for k in (*side, *other))]
    with pytest.raises(ConfigError):
        config(*arguments(argv))


def test_the_two_reported_commands_run_the_decay_they_ask_for():
    cfg = config(*arguments(["scheduler=exponential", "scheduler.decay_rate=0.5",
                             "scheduler.decay_steps=10", "trainer.max_steps=50"]))
    s = cfg.scheduler
    assert s.gamma is None
    for e in range(50):  # TF's exponential_decay, written out
        assert s.decay(e, 50, 1.0) == pytest.approx(0.5 ** (e / 10), rel=1e-12)
    cfg = config(*arguments(["scheduler=wsd", "scheduler.decay_steps=12",
                             "trainer.max_steps=100"]))
    assert cfg.scheduler.decay_ratio is None and cfg.scheduler.decay_length(100) == 12
    w = cfg.scheduler.warmup(100)
    lrs = [cfg.scheduler.lr(k, 1.0, 100) for k in range(1, 101)]
    assert lrs[w:100 - 12] == [1.0] * (100 - 12 - w)  # stable until the last 12 updates
    assert all(lr < 1.0 for lr in lrs[100 - 12 + 1:])


def test_resume_replaces_a_saved_side_with_the_new_one(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    first = arguments(["scheduler=wsd", "scheduler.decay_steps=12", "trainer.max_steps=1000"])
    (run / ".hydra/overrides.yaml").write_text(OmegaConf.to_yaml(first))
    merged = one_of(continue_run(run, ["scheduler.decay_ratio=0.3", "scheduler.warmup_steps=4"]))
    cfg = config(*[a for a in merged if not a.startswith(("resume=", "hydra."))])
    s = cfg.scheduler
    assert (s.decay_steps, s.decay_ratio, s.warmup_steps, s.warmup_ratio) == (None, 0.3, 4, None)
    assert cfg.trainer.max_steps == 1000


def test_resume_that_switches_the_option_drops_the_old_options_keys(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    first = ["scheduler=step", "scheduler.step_size=7", "scheduler.gamma=0.5", "clip=value",
             "clip.max_value=0.5", "optimizer.lr=0.01"]
    (run / ".hydra/overrides.yaml").write_text(OmegaConf.to_yaml(first))
    merged = continue_run(run, ["scheduler=cosine", "scheduler.min_lr=0.001", "clip=norm"])
    cfg = config(*[a for a in merged if not a.startswith(("resume=", "hydra."))])
    assert option_name(cfg.scheduler, SCHEDULES) == "cosine" and cfg.scheduler.min_lr == 0.001
    assert option_name(cfg.clip, CLIPPERS) == "norm"
    assert cfg.optimizer.lr == 0.01  # keys of groups not switched are kept
    # the same option named again keeps the saved keys
    merged = continue_run(run, ["scheduler=step"])
    assert "scheduler.step_size=7" in merged


# -- trainrun --help ------------------------------------------------------------------

@pytest.mark.slow
def test_help_names_trainrun_and_lists_the_real_options_only(tmp_path):
    proc = cli("--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.startswith("usage: trainrun") and "Hydra" not in text.splitlines()[0]
    assert "_schema" not in text and "schemas" not in text and "powered by" not in text
    for group in groups():
        assert group in text
        for option in options(group):
            assert option in text, (group, option)
    assert "Examples:" in text and "trainrun -m" in text
    job = cli("--cfg", "job", "scheduler=wsd", cwd=tmp_path, timeout=120)
    assert job.returncode == 0, job.stderr
    assert OmegaConf.create(job.stdout).scheduler.decay_type == "1-sqrt"
    assert list(tmp_path.iterdir()) == []  # neither wrote a run directory


def pasted(line: str) -> list[str]:
    """The words a shell makes of `line` pasted as it is, its comment and all."""
    out = subprocess.run(["bash", "-c", f"printf '%s\\0' {line}"], capture_output=True,
                         text=True, check=True).stdout
    return out.split("\0")[:-1]


def test_every_help_example_pasted_into_a_shell_is_accepted(tmp_path, finished_run, monkeypatch):
    """Each line under "Examples:" of `trainrun --help`, pasted into bash, gives the arguments
    that trainrun's pre-flight (or the companion command's parser) accepts, its comment gone."""
    from trainrun import identical, sweep
    from trainrun.commands import sample
    from trainrun.commands.lr import parse_args
    from trainrun.composition import preflight, validated_configs
    from trainrun.data.tokenizers import ByteTokenizer
    from trainrun.resume import AlreadyComplete

    proc = cli("--help", cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("Examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(lines) >= 10
    # what the examples name: a run to resume, a Hugging Face GPT-2 folder of the default shape
    monkeypatch.chdir(tmp_path)
    shutil.copytree(finished_run, tmp_path / "outputs/2026-11-21/14-03-12")
    hf = tmp_path / "hf-folder"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4, "n_inner": 512,
        "n_positions": 256, "vocab_size": ByteTokenizer.vocab_size}))
    (hf / "model.safetensors").write_bytes(b"")
    monkeypatch.setenv(identical.ENV, "{}")  # what a sweep's pre-flight hands its jobs
    monkeypatch.setenv(sweep.SWEPT, "[]")

    def accepted(args: list[str]) -> None:
        try:
            preflight(arguments(args))
        except AlreadyComplete:  # the resumed run has all its updates: nothing to do, exit 0
            pass

    for line in lines:
        command, *args = pasted(line)
        assert "#" not in " ".join(args), line
        if command in ("trainrun", "trainrun-nohup"):  # trainrun-nohup: trainrun's pre-flight
            accepted(args)
        elif command == "torchrun":
            accepted(args[args.index("trainrun") + 1:])
        elif command == "trainrun-lr":
            validated_configs([parse_args(args)[2]], data=False)
        elif command == "trainrun-sample":
            found, extra = sample.parser().parse_known_args(args)
            assert (found.run_dir, found.prompt, extra) == ("RUN_DIR", "def ", [])
        else:
            raise AssertionError(f"an example of an unknown command: {line}")


def test_schemas_are_not_options():
    with pytest.raises(ConfigError) as err:
        config("scheduler=cosine_schema")
    assert err.value.key == "scheduler" and "cosine_schema" in str(err.value)


# -- paths in overrides ----------------------------------------------------------------

PATHS = ["outputs/2026-11-23/12-00-00", "/tmp/wörk, [a] 'q'/run=1", 'a"b', "x\\", "${oc.env:HOME}",
         "c:\\d\\${e}", "null", "1e3", "a b,c"]


@pytest.mark.parametrize("path", PATHS)
def test_quoted_paths_read_back_unchanged(path):
    value = OverridesParser.create().parse_override(f"resume={quote(path)}").value()
    assert OmegaConf.create({"v": value}).v == path  # interpolations stay text
    # and through the shell, as the printed command is copied
    (word,) = shlex.split(command(path)[len("trainrun "):])
    assert OverridesParser.create().parse_override(word).value() == value


def test_plain_paths_print_unquoted():
    assert command("outputs/2026-11-23/12-00-00") == "trainrun resume=outputs/2026-11-23/12-00-00"


# each a character of Hydra's grammar (a sweep, a list, a quote, an escape, an interpolation,
# a key) or one its lexer does not take (non-ASCII), in a real directory's name
NAMES = ["a,b", "[x]", "it's", "wörk", "a b", "run=1", 'say "hi"', "back\\slash", "${x}",
         "wörk, [x] it's/run=1"]


@pytest.mark.parametrize("name", NAMES)
def test_resume_takes_a_path_as_the_shell_passes_it(tmp_path, name):
    run = tmp_path / name
    (run / "checkpoints").mkdir(parents=True)
    args = arguments([f"resume={run}", "trainer.max_steps=5"])
    read = {key: OmegaConf.create({"v": OverridesParser.create().parse_override(a).value()}).v
            for a in args for key in ("resume", "hydra.run.dir") if a.startswith(f"{key}=")}
    assert read == {"resume": str(run), "hydra.run.dir": str(run)}  # as Hydra reads them
    assert config(*[a for a in args if not a.startswith("hydra.")]).resume == str(run)


def test_resume_keeps_the_quoted_form_it_prints(tmp_path):
    run = tmp_path / "wörk, [x] it's" / "run=1"
    (run / "checkpoints").mkdir(parents=True)
    (word,) = shlex.split(command(run)[len("trainrun "):])  # as the shell hands it over
    assert word.startswith('resume="')
    assert config(*[a for a in arguments([word]) if not a.startswith("hydra.")]).resume == str(run)
    for special in ("auto", "null"):
        assert arguments([f"resume={special}"]) == [f"resume={special}"]


def test_a_sweep_does_not_continue_one_run_directory(tmp_path):
    run = tmp_path / "a,b"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        arguments(["-m", f"resume={run}", "optimizer.lr=0.1,0.2"])
    assert err.value.key == "resume" and "allowed: resume=auto with the sweep's" in str(err.value)
    assert arguments(["-m", "resume=auto", "optimizer.lr=0.1,0.2"])[-1] == "resume=auto"


# -- the trust boundary ----------------------------------------------------------------

REFUSED = [
    "+hydra.callbacks.x._target_=builtins.open",
    "hydra.job.chdir=true",
    "hydra/launcher=basic",
    "data.files=${oc.env:HOME}",
    "trainer.max_steps=${oc.decode:'5'}",
    "++trainer.seed=3",
    "~scheduler.step_size",
    "+optimizer.extra=1",
    "optimizer@trainer=adamw",
    "optimizer.lr=0.1,0.2",
    "scheduler=not_an_option",
    "unknown.key=1",
    5,
    ["a"],
    "optimizer.lr=[",
]


@pytest.mark.parametrize("entry", REFUSED, ids=[str(e) for e in REFUSED])
def test_a_run_directory_holds_only_trainruns_keys(tmp_path, entry):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra/overrides.yaml").write_text(yaml.safe_dump(["trainer.max_steps=5", entry]))
    with pytest.raises(ConfigError) as err:
        saved(tmp_path)
    message = str(err.value)
    assert err.value.key == "resume" and "overrides.yaml" in message and "\n" not in message
    assert repr(entry) in message


@pytest.mark.parametrize("text", ["- [unclosed\n", "key: value\n", "- a\n -b: [\n", "\xff\xfe"])
def test_a_malformed_overrides_file_is_one_line(tmp_path, text):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra/overrides.yaml").write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        saved(tmp_path)
    assert "overrides.yaml" in str(err.value) and "\n" not in str(err.value)


def test_trainruns_own_overrides_are_taken(tmp_path):
    (tmp_path / ".hydra").mkdir()
    entries = ["scheduler=wsd", "scheduler.decay_steps=12", "data.files='/a b/*.txt'",
               "optimizer.betas=[0.9,0.99]", f"resume={quote(str(tmp_path))}", "precision=fp32"]
    (tmp_path / ".hydra/overrides.yaml").write_text(yaml.safe_dump(entries))
    assert saved(tmp_path) == entries


def test_cfg_prints_only_what_a_run_would_take(tmp_path, corpus):
    bad = cli("--cfg", "job", "trainer.max_steps=0", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip() == ("trainrun: error: trainer.max_steps: got 0; allowed: a finite "
                                  "number > 0")
    run = cli(*tiny(corpus, "trainer.max_steps=2", "trainer.log_every=7", "hydra.run.dir=r"),
              cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    # --cfg with resume= prints the resumed run's config: its saved overrides, then these
    shown = cli("--cfg", "job", f"resume={tmp_path / 'r'}", "trainer.max_steps=5", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "log_every: 7" in shown.stdout and "max_steps: 5" in shown.stdout
