"""A run started with `--config-dir` (options of the user's own): its overrides are checked
before anything is written, it resumes when given the same folder again, the commands
after training take the folder too, and the resume commands it prints name it. The folder
always comes from the command line, never from the run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import cli, tiny

from trainrun.commands import eval as evaluate
from trainrun.commands.launch import resume_hint
from trainrun.resume import command


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A config folder adding one model option, `wee`, of one layer."""
    root = tmp_path_factory.mktemp("myconf")
    (root / "model").mkdir()
    (root / "model" / "wee.yaml").write_text(
        "defaults:\n  - /schemas/model/model@_here_\n  - _self_\n\n"
        "d_model: 32\nn_layers: 1\nn_heads: 2\nd_ff: 64\ndropout: 0.0\nmax_seq_len: 64\n")
    return root


def wee(corpus: Path, *overrides: str) -> list[str]:
    """The tiny run on the folder's model."""
    return ["model=wee", *[o for o in tiny(corpus, *overrides) if not o.startswith("model.")]]


@pytest.fixture(scope="module")
def started(tmp_path_factory, corpus, folder) -> Path:
    cwd = tmp_path_factory.mktemp("started")
    run = cwd / "run"
    proc = cli("--config-dir", str(folder), *wee(corpus, "trainer.max_steps=4",
                                                 "trainer.eval_every=4"),
               f"hydra.run.dir={run}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return run


def snapshot(run: Path) -> dict:
    return {p: p.read_bytes() if p.is_file() else None for p in run.rglob("*")}


def saved_config(run: Path) -> dict:
    return yaml.safe_load((run / ".hydra" / "config.yaml").read_text())


def test_the_folders_options_are_checked_before_anything_is_written(tmp_path, folder, corpus):
    unknown = cli("--config-dir", str(folder), "model=nope", cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr == ("trainrun: error: model: unknown option 'nope'; allowed: "
                              "gpt2_124m, gpt_small, gpt_tiny, llama_small, llama_tiny, "
                              "smollm_135m, transformer_base, transformer_small, "
                              "transformer_tiny, wee\n")
    bad = cli(f"-cd={folder}", "--cfg", "job", *wee(corpus, "trainer.max_steps=0"), cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("trainrun: error: trainer.max_steps: ")
    assert len(bad.stderr.splitlines()) == 1 and bad.stdout == ""
    missing = cli("--config-dir", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.startswith(f"trainrun: error: --config-dir: {tmp_path / 'nowhere'}: "
                                     f"no such folder")
    assert list(tmp_path.iterdir()) == []  # no run directory


def test_a_run_started_with_config_dir_resumes_only_with_it(tmp_path, started, folder):
    run = tmp_path / "run"
    shutil.copytree(started, run)
    before = snapshot(run)
    without = cli(f"resume={run}", "trainer.max_steps=6", cwd=tmp_path)
    assert without.returncode == 2 and len(without.stderr.splitlines()) == 1
    assert without.stderr.startswith(f"trainrun: error: resume: {run}/.hydra/overrides.yaml: "
                                     f"entry 'model=wee': 'wee' of model is not an option")
    assert (f"the run was started with --config-dir {folder}: allowed: the same --config-dir, "
            f"as in `trainrun --config-dir {folder} resume={run}`") in without.stderr
    assert snapshot(run) == before

    resumed = cli("--config-dir", str(folder), f"resume={run}", "trainer.max_steps=6",
                  cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "metrics.json").read_text())["steps"] == 6
    old, new = saved_config(started), saved_config(run)
    assert new["model"] == old["model"] and new["model"]["n_layers"] == 1
    assert new["trainer"] == {**old["trainer"], "max_steps": 6}
    assert not (tmp_path / "outputs").exists()


def test_a_used_run_directory_names_the_resume_command_with_the_folder(tmp_path, started,
                                                                       folder, corpus):
    proc = cli("--config-dir", str(folder), *wee(corpus), f"hydra.run.dir={started}",
               cwd=tmp_path)
    assert proc.returncode == 2
    assert f"`trainrun --config-dir {folder} resume={started}` to continue it" in proc.stderr


def test_commands_after_training_take_the_folder(started, folder, capsys):
    with pytest.raises(SystemExit) as refused:
        evaluate.main([str(started), "--max-batches", "1"])
    assert refused.value.code == 2
    assert f"--config-dir {folder}" in capsys.readouterr().err
    evaluate.main([str(started), "--config-dir", str(folder), "--max-batches", "1", "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] > 0


def test_printed_resume_commands_keep_the_folder(tmp_path):
    assert command(Path("/r/un"), Path("/my conf")) == "trainrun --config-dir '/my conf' resume=/r/un"
    assert command(Path("/r/un")) == "trainrun resume=/r/un"
    for given in (["--config-dir", "conf"], ["-cd", "conf"], ["--config-dir=conf"]):
        assert resume_hint(Path("r"), [*given, "model=wee"], False) == \
            f"trainrun {' '.join(given)} resume=r"


# options of a folder that would set Hydra's own settings behind pre-flight's back
HYDRA_SETTINGS = {
    "run-dir": ("model/away.yaml", "# @package _global_\ndefaults:\n  - /model/gpt_tiny@model\n"
                "hydra:\n  run:\n    dir: {tmp}/elsewhere\n", "model=away", "hydra.run.dir"),
    "callback": ("model/away.yaml", "# @package _global_\ndefaults:\n  - /model/gpt_tiny@model\n"
                 "hydra:\n  callbacks:\n    x:\n      _target_: builtins.open\n"
                 "      file: {tmp}/ran\n      mode: w\n", "model=away", "hydra.callbacks.x"),
    "launcher": ("clip/away.yaml", "# @package _global_\ndefaults:\n  - /clip/norm@clip\n"
                 "  - override /hydra/launcher: joblib\n", "clip=away", "hydra.launcher."),
    "hydra-folder": ("hydra/launcher/mine.yaml", "n_jobs: 1\n", "model=gpt_tiny",
                     "myconf/hydra: options of Hydra's own groups"),
}


@pytest.mark.parametrize("path, text, choice, named", HYDRA_SETTINGS.values(),
                         ids=HYDRA_SETTINGS.keys())
def test_a_folder_may_not_set_hydras_own_settings(tmp_path, corpus, path, text, choice, named):
    folder = tmp_path / "myconf"
    (folder / path).parent.mkdir(parents=True)
    (folder / path).write_text(text.format(tmp=tmp_path))
    cwd = tmp_path / "work"
    cwd.mkdir()
    proc = cli("--config-dir", str(folder), choice, *tiny(corpus, "trainer.max_steps=2"),
               cwd=cwd)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("trainrun: error: --config-dir: ") and named in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myconf", "work"]  # nothing ran
    assert list(cwd.iterdir()) == []


def test_a_folders_search_preset_may_set_the_sweeper(tmp_path):
    """hparams_search options are search presets: they set Hydra's sweeper, as trainrun's
    own optuna does."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from trainrun.composition import preflight

    folder = tmp_path / "myconf"
    (folder / "hparams_search").mkdir(parents=True)
    (folder / "hparams_search/mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /hydra/sweeper: optuna\n"
        "hydra:\n  mode: MULTIRUN\n  sweeper:\n    n_trials: 2\n    params:\n"
        "      optimizer.lr: interval(1e-4, 1e-2)\n")
    preflight(["--config-dir", str(folder), "hparams_search=mine", "trainer.max_steps=2"])
