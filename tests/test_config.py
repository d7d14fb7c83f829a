"""Configuration (docs/configuration.md): every option of every group composes with its schema and
validates; bad input fails before any work with one line naming the key, exit status 2, no
traceback and no run directory."""

from __future__ import annotations

import dataclasses
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import REPO, cli, config
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from trainrun import composition as trainrun_cli
from trainrun.composition.init_from import option_family
from trainrun.config import GROUPS, Config, TrainerConfig, option_name
from trainrun.errors import ConfigError
from trainrun.models import MODELS

CONF = REPO / "conf"
DEFAULTS = [next(iter(d)) for d in OmegaConf.load(CONF / "config.yaml").defaults
            if isinstance(d, dict) or OmegaConf.is_dict(d)]
# Every conf/<group>/<option>.yaml, found on disk, so that options added later are covered;
# but the presets of Hydra's own config (hydra/, and hparams_search/, whose options configure
# a sweeper of the sweep extra: tests/test_sweeps.py)
OPTIONS = [(group.name, yaml.stem)
           for group in sorted(p for p in CONF.iterdir()
                               if p.is_dir() and p.name not in ("hydra", "hparams_search"))
           for yaml in sorted(group.glob("*.yaml"))]


def composed(*overrides: str):
    """The composed DictConfig (before validation) of `trainrun <overrides>`."""
    with initialize_config_module(config_module="trainrun.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Files and folders that data=text / data=hf options need, and bad ones."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "corpus.txt").write_text("one document\nand another one\nand a third\n")
    (root / "ds").mkdir()
    for split in ("train", "validation"):
        (root / "ds" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": f"{split} {i}"}) + "\n" for i in range(5)))
    (root / "empty").mkdir()
    (root / "empty" / "a.txt").write_text("")
    (root / "empty" / "b.txt").write_text("")
    (root / "blank").mkdir()
    (root / "blank" / "a.txt").write_text("\n  \n\t\n")
    from trainrun.data.tokenizers import ByteTokenizer

    ByteTokenizer().hf().save(str(root / "tokenizer.json"))
    (root / "pairs.src").write_text("ka di\nmi bu\n")
    (root / "pairs.tgt").write_text("IDx AKx\nUBx IMx\n")
    return {"corpus": root / "corpus.txt", "ds": root / "ds", "empty": root / "empty",
            "blank": root / "blank", "tokenizer": root / "tokenizer.json",
            "pairs": [f"data.source_files={root / 'pairs.src'}",
                      f"data.target_files={root / 'pairs.tgt'}"]}


def needs(group: str, option: str, inputs: dict) -> list[str]:
    """The overrides an option needs to compose (its inputs; `+` for groups that
    conf/config.yaml does not select by default)."""
    select = f"{group}={option}" if group in DEFAULTS else f"+{group}={option}"
    extra = {("data", "text"): [f"data.files={inputs['corpus']}"],
             ("data", "hf"): [f"data.path={inputs['ds']}", "data.val_split=validation"],
             ("tokenizer", "hf"): [f"tokenizer.path={inputs['tokenizer']}"],
             ("optimizer", "schedulefree"): ["scheduler=constant"],  # the one it takes
             ("data", "parallel"): ["model=transformer_tiny", *inputs["pairs"]],
             ("data", "mix"): [f"data.sources={{a: {{data: text, files: '{inputs['corpus']}'}}, "
                               f"b: {{data: builtin, weight: 2}}}}"]}
    if group == "model" and option_family(option, None) == "seq2seq":  # its data: pairs
        return [select, "data=parallel", *inputs["pairs"]]
    return [select, *extra.get((group, option), [])]


# -- composition ---------------------------------------------------------------------


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_validates_and_leaves_nothing_missing(group, option, inputs):
    overrides = needs(group, option, inputs)
    dict_config = composed(*overrides)
    assert OmegaConf.missing_keys(dict_config) == set()

    cfg = config(*overrides)  # to dataclasses, then validate()
    assert isinstance(cfg, Config)
    if group in GROUPS:
        assert option_name(getattr(cfg, group), GROUPS[group]) == option
    elif group == "model":  # the family its YAML extends
        family = OmegaConf.load(CONF / group / f"{option}.yaml").defaults[0].split("/")[-1]
        assert type(cfg.model) is MODELS[family.removesuffix("@_here_")]
    # the option's own YAML values are in force, except the keys that conf/config.yaml
    # (data.batch_size, data.seq_len) or the overrides above set
    own = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    own.pop("defaults", None)
    top = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml")).get(group, {})
    given = {o.split("=")[0].split(".")[-1] for o in overrides[1:]}
    for key, value in own.items():
        if key not in top and key not in given and value != "???":
            assert OmegaConf.to_container(dict_config[group])[key] == value, f"{group}.{key}"


def test_each_group_registry_is_its_yaml_files():
    for group, registry in GROUPS.items():
        on_disk = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        assert sorted(registry) == on_disk, group
        assert trainrun_cli.options(group) == on_disk  # the list error messages give
    assert {"gpt_tiny", "gpt_small", "gpt2_124m"} <= {o for g, o in OPTIONS if g == "model"}
    assert {"builtin", "text", "hf"} <= set(GROUPS["data"])
    assert {"none", "norm"} <= set(GROUPS["clip"])
    assert {"auto", "fp32", "fp16", "bf16"} <= set(GROUPS["precision"])


def test_defaults_are_the_specs():
    cfg = config()
    choices = dict(next(iter(d.items())) for d in
                   OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))["defaults"]
                   if isinstance(d, dict) and not next(iter(d)).startswith("override"))
    assert choices["model"] == "gpt_tiny" and choices["data"] == "builtin"
    assert choices["optimizer"] == "adamw" and choices["clip"] == "norm"
    assert choices["precision"] == "auto"
    assert cfg.model == config("model=gpt_tiny").model
    assert option_name(cfg.data, GROUPS["data"]) == "builtin"
    assert option_name(cfg.optimizer, GROUPS["optimizer"]) == "adamw"
    assert option_name(cfg.clip, GROUPS["clip"]) == "norm" and cfg.clip.max_norm == 1.0
    assert option_name(cfg.precision, GROUPS["precision"]) == "auto"
    assert cfg.resume is None and cfg.data.packing is True


def test_spec_keys_exist_with_values():
    cfg = config()
    trainer = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert {"max_steps", "grad_accum_steps", "eval_every", "eval_sequences", "log_every",
            "ckpt_every", "keep_last", "seed", "device", "compile", "max_skipped",
            "deterministic"} <= trainer
    assert cfg.trainer.deterministic is False
    for key in ("d_model", "n_layers", "n_heads", "d_ff", "dropout", "max_seq_len"):
        assert getattr(cfg.model, key) is not None
    for key in ("batch_size", "seq_len", "packing"):
        assert getattr(cfg.data, key) is not None
    assert cfg.optimizer.lr > 0 and cfg.optimizer.weight_decay >= 0
    assert cfg.trainer.device == "auto"
    # an override of any key reaches the validated config
    cfg = config("trainer.max_steps=7", "optimizer.lr=0.5", "data.seq_len=64", "model.n_layers=1")
    assert (cfg.trainer.max_steps, cfg.optimizer.lr, cfg.data.seq_len, cfg.model.n_layers) \
        == (7, 0.5, 64, 1)


def test_the_configuration_page_lists_every_trainer_key():
    page = (REPO / "docs" / "configuration.md").read_text()
    for f in dataclasses.fields(TrainerConfig):
        assert f"| `trainer.{f.name}` |" in page, f.name


@pytest.mark.parametrize("option,key", [("text", "data.files"), ("hf", "data.path")])
def test_the_only_key_left_to_the_user_is_the_data_location(option, key):
    assert OmegaConf.missing_keys(composed(f"data={option}")) == {key}
    with pytest.raises(ConfigError) as err:
        trainrun_cli.preflight([f"data={option}"])
    assert err.value.key == key


# -- bad input (docs/design.md, Bad input) ----------------------------------------

CUDA = torch.cuda.is_available()


# (overrides, dotted key, words the message must hold); {name} is a path from `inputs`
BAD = [
    pytest.param(["optimizer=adamx"], "optimizer", ["'adamx'", *trainrun_cli.options("optimizer")],
                 id="unknown-option"),
    pytest.param(["model=gpt5"], "model", ["gpt5", "gpt_tiny", "gpt_small", "gpt2_124m"],
                 id="unknown-model"),
    pytest.param(["trainer.foo=1"], "trainer.foo",
                 ["unknown key", *(f.name for f in dataclasses.fields(TrainerConfig))],
                 id="unknown-key"),
    pytest.param(["+optimizer.foo=1"], "optimizer.foo", ["unknown key", "lr"], id="added-key"),
    pytest.param(["+foo=1"], "foo", ["unknown key", "trainer"], id="added-root-key"),
    pytest.param(["trainer.max_steps=abc"], "trainer.max_steps", ["abc"], id="not-an-int"),
    pytest.param(["trainer.max_steps=1.5"], "trainer.max_steps", ["1.5"], id="float-for-int"),
    pytest.param(["optimizer.lr=fast"], "optimizer.lr", ["fast"], id="not-a-float"),
    pytest.param(["data.packing=maybe"], "data.packing", ["maybe"], id="not-a-bool"),
    pytest.param(["optimizer.lr=-1"], "optimizer.lr", ["-1", "> 0"], id="negative-lr"),
    pytest.param(["optimizer.lr=0"], "optimizer.lr", ["0", "> 0"], id="zero-lr"),
    pytest.param(["optimizer.lr=nan"], "optimizer.lr", ["nan"], id="nan-lr"),
    pytest.param(["optimizer.weight_decay=-0.1"], "optimizer.weight_decay", ["-0.1", ">= 0"],
                 id="negative-decay"),
    pytest.param(["trainer.max_steps=0"], "trainer.max_steps", ["0"], id="zero-steps"),
    pytest.param(["clip.max_norm=0"], "clip.max_norm", ["0", "> 0"], id="zero-max-norm"),
    pytest.param(["clip.max_norm=-2"], "clip.max_norm", ["-2"], id="negative-max-norm"),
    pytest.param(["scheduler.warmup_ratio=null", "scheduler.warmup_steps=1000",
                  "trainer.max_steps=10"], "scheduler.warmup_steps",
                 ["1000", "trainer.max_steps=10"], id="warmup-longer-than-run"),
    pytest.param(["scheduler.warmup_ratio=1.5", "trainer.max_steps=10"],
                 "scheduler.warmup_ratio", ["1.5"], id="warmup-ratio-above-one"),
    pytest.param(["scheduler.warmup_steps=1000", "trainer.max_steps=10"],
                 "scheduler.warmup_steps", ["1000", "trainer.max_steps=10"],
                 id="warmup-steps-on-the-default-schedule"),
    pytest.param(["scheduler.warmup_steps=5", "scheduler.warmup_ratio=0.1"],
                 "scheduler.warmup_", ["warmup_steps", "warmup_ratio"], id="warmup-both"),
    pytest.param(["data=text", "data.files=/nonexistent/*.txt"], "data.files",
                 ["/nonexistent/*.txt"], id="files-match-nothing"),
    pytest.param(["data=text", "data.files={empty}/*.txt"], "data.files", ["empty"],
                 id="files-all-empty"),
    pytest.param(["data=text", "data.files={blank}/*.txt"], "data.files", ["empty"],
                 id="files-all-blank"),
    pytest.param(["trainer.device=tpu"], "trainer.device", ["tpu", "auto", "cpu", "cuda"],
                 id="unknown-device"),
    pytest.param(["trainer.device=cuda"], "trainer.device", ["cuda"], id="no-cuda",
                 marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA")),
    pytest.param(["model.n_heads=3"], "model.n_heads", ["3", "d_model=128", "allowed", "4"],
                 id="heads-not-dividing-width"),
    pytest.param(["data.seq_len=1000"], "data.seq_len", ["1000", "max_seq_len=256"],
                 id="seq-len-above-positions"),
    pytest.param(["model.dropout=1.5"], "model.dropout", ["1.5"], id="dropout-above-one"),
    pytest.param(["data.batch_size=0"], "data.batch_size", ["0"], id="zero-batch"),
    pytest.param(["data.tokenize_workers=0"], "data.tokenize_workers",
                 ["'0'", "auto", "from 1 to 1024"], id="zero-tokenize-workers"),
    pytest.param(["data.tokenize_workers=many"], "data.tokenize_workers",
                 ["'many'", "auto", "from 1 to 1024"], id="tokenize-workers-not-a-number"),
    pytest.param(["trainer.seed=-1"], "trainer.seed", ["-1"], id="negative-seed"),
    pytest.param(["optimizer.betas=[0.9]"], "optimizer.betas", ["0.9"], id="one-beta"),
    pytest.param(["scheduler.min_lr=0.1"], "scheduler.min_lr",
                 ["0.1 is above optimizer.lr=0.003, the peak", "0 <= min_lr <= optimizer.lr"],
                 id="min-lr-above-lr"),
    pytest.param(["scheduler=polynomial", "optimizer.lr=1e-4", "scheduler.end_lr=1e-3"],
                 "scheduler.end_lr", ["0.001 is above optimizer.lr=0.0001"],
                 id="end-lr-above-lr"),
]


def expand(overrides: list[str], inputs: dict) -> list[str]:
    return [o.format(**inputs) for o in overrides]


@pytest.mark.parametrize("overrides,key,words", BAD)
def test_bad_input_is_one_config_error_naming_the_key(overrides, key, words, inputs):
    try:
        trainrun_cli.preflight(trainrun_cli.arguments(expand(overrides, inputs)))
    except ConfigError as err:
        error = err
    else:
        pytest.fail(f"{overrides} was accepted")
    assert error.key.startswith(key), str(error)
    assert "\n" not in str(error)
    for word in words:
        assert word in str(error), f"{word!r} not in {str(error)!r}"


# A few of the cases above through the real console script (about 2 s each): each way
# composition fails (unknown option, unknown key, wrong type), validate(), and the device
# (checked where the machine is known).
CLI_CASES = {
    "unknown-option": (["optimizer=adamx"], "optimizer"),
    "added-key": (["+optimizer.foo=1"], "optimizer.foo"),
    "not-an-int": (["trainer.max_steps=abc"], "trainer.max_steps"),
    "warmup-longer-than-run": (["scheduler.warmup_ratio=null", "scheduler.warmup_steps=1000",
                                "trainer.max_steps=10"], "scheduler.warmup_steps"),
    "no-cuda": (["trainer.device=cuda"], "trainer.device"),
    "min-lr-above-lr": (["scheduler.min_lr=0.1"], "scheduler.min_lr"),
    "tokenize-workers-not-a-number": (["data.tokenize_workers=many"], "data.tokenize_workers"),
}


@pytest.fixture(scope="module")
def cli_runs(inputs, tmp_path_factory) -> dict:
    """Every CLI case in its own empty working directory, two processes at a time."""
    def run(name):
        if name == "no-cuda" and CUDA:
            return None
        cwd = tmp_path_factory.mktemp(name)
        overrides, _ = CLI_CASES[name]
        return cwd, cli(*expand(overrides, inputs), cwd=cwd, timeout=120)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(CLI_CASES, pool.map(run, CLI_CASES), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA"))
    if n == "no-cuda" else n for n in CLI_CASES])
def test_cli_bad_input_one_line_exit_2_no_traceback_no_run_dir(name, cli_runs):
    cwd, proc = cli_runs[name]
    _, key = CLI_CASES[name]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"trainrun: error: {key}:"), lines[0]
    assert proc.returncode == 2
    assert sorted(p.name for p in cwd.iterdir()) == []  # no outputs/, multirun/, nothing
