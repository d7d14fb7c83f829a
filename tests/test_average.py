"""trainrun-average on a real run (three checkpoints, updates 10, 20 and 30): copies of one
checkpoint give it back bit for bit, three different ones their mean computed here with
safetensors and torch, the commands after training read the average through --checkpoint,
a resumed run continues from the newest step and not from the average, and bad input is
one line with exit status 2 and nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_identical, cli, tiny, weights
from safetensors.torch import load_file, save_file
from test_after import exits_2, one_line

from trainrun import checkpoint
from trainrun.after.average import average
from trainrun.after.run import open_run
from trainrun.commands import average as command
from trainrun.commands import eval as evaluate
from trainrun.commands import export, sample
from trainrun.errors import ConfigError

PROG = "trainrun-average"
STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def three(tmp_path_factory, corpus) -> Path:
    """A run of the real `trainrun` process with checkpoints at updates 10, 20 and 30.
    Tests that write into it copy it first."""
    run = tmp_path_factory.mktemp("three") / "run"
    proc = cli(*tiny(corpus, "trainer.max_steps=30", "trainer.ckpt_every=10",
                     "trainer.eval_every=10", f"hydra.run.dir={run}"), cwd=run.parent)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in checkpoint.complete(run / "checkpoints")] == \
        [checkpoint.step_name(k) for k in STEPS]
    return run


@pytest.fixture
def run(three, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(three, copy)
    return copy


def model_file(run: Path, name: str) -> Path:
    return run / "checkpoints" / name / checkpoint.MODEL_FILE


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of the run directory and its contents."""
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def copy_as(run: Path, source: int, k: int) -> None:
    """Checkpoint `source` again as update k, as checkpoint.save would write the same files
    then: meta.json's step changed, its sha256 of the same files the same."""
    root = run / "checkpoints"
    new = root / checkpoint.step_name(k)
    shutil.copytree(root / checkpoint.step_name(source), new)
    meta = checkpoint.read_meta(new)
    (new / checkpoint.META_FILE).write_text(json.dumps({**meta, "step": k}, indent=2) + "\n")
    (root / checkpoint.LATEST).write_text(new.name + "\n")


def test_copies_of_one_checkpoint_average_to_it_bit_for_bit(run, capsys):
    copy_as(run, 30, 40)
    copy_as(run, 30, 50)
    command.main([str(run), "--last", "3"])
    out = capsys.readouterr().out.splitlines()
    name = "average-00000030-00000050"
    assert out == [*(f"averaged {run}/checkpoints/step-000000{k}" for k in (30, 40, 50)),
                   f"wrote {run}/checkpoints/{name}"]
    assert_identical(weights(model_file(run, name)), weights(model_file(run, "step-00000030")))


def test_three_checkpoints_average_to_their_mean(run, capsys):
    before = {p.name for p in (run / "checkpoints").iterdir()}
    latest = (run / "checkpoints/latest").read_bytes()
    command.main([str(run), "--last", "3"])
    name = "average-00000010-00000030"
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {run}/checkpoints/{name}"
    parts = [load_file(str(model_file(run, checkpoint.step_name(k)))) for k in STEPS]
    got = weights(model_file(run, name))
    assert got.keys() == parts[0].keys()
    for key, tensor in got.items():
        mean = (parts[0][key].double() + parts[1][key].double() + parts[2][key].double()) / 3
        assert tensor.dtype == parts[0][key].dtype
        assert torch.equal(tensor, mean.to(tensor.dtype)), key
    assert any(not torch.equal(got[k], parts[2][k]) for k in got)  # not the newest one
    meta = checkpoint.read_meta(run / "checkpoints" / name)
    assert meta["step"] == 30 and meta["weights_only"] is True
    assert meta["average"]["steps"] == list(STEPS)
    newest = checkpoint.read_meta(run / "checkpoints/step-00000030")
    assert {k: meta[k] for k in ("config", "schemas", "tokenizer")} == \
        {k: newest[k] for k in ("config", "schemas", "tokenizer")}
    assert checkpoint.verify(run / "checkpoints" / name) is None
    # the average is one folder more: latest, the steps and the lock file are as they were
    assert {p.name for p in (run / "checkpoints").iterdir()} == before | {name}
    assert (run / "checkpoints/latest").read_bytes() == latest
    assert not (run / ".trainrun.lock").exists()


def test_a_damaged_checkpoint_is_left_out_and_verify_still_guards_the_average(run, capsys):
    with open(model_file(run, "step-00000030"), "ab") as f:
        f.write(b"\0")
    exits_2(command.main, str(run), "--last", "3")
    assert "got 3, but" in one_line(capsys, PROG, "--last")
    command.main([str(run), "--last", "2"])
    captured = capsys.readouterr()
    assert "step-00000030 is damaged" in captured.err
    assert captured.out.splitlines()[-1].endswith("checkpoints/average-00000010-00000020")
    average_dir = run / "checkpoints/average-00000010-00000020"
    with open(average_dir / checkpoint.MODEL_FILE, "ab") as f:
        f.write(b"\0")
    assert "does not match its sha256" in checkpoint.verify(average_dir)
    # the weights-only mark holds for such a folder only, never for a step that resume reads
    step = run / "checkpoints/step-00000020"
    meta = checkpoint.read_meta(step)
    (step / checkpoint.STATE_FILE).unlink()
    del meta["sha256"][checkpoint.STATE_FILE]
    (step / checkpoint.META_FILE).write_text(json.dumps({**meta, "weights_only": True}))
    assert "does not list exactly the files" in checkpoint.verify(step)


def test_the_commands_after_training_read_the_average(run, tmp_path, capsys):
    name = "avg3"
    command.main([str(run), "--last", "3", "--checkpoint-name", name])
    capsys.readouterr()
    opened = open_run(str(run), [], name, data=False)
    assert opened.checkpoint == run / "checkpoints" / name and opened.step == 30
    assert_identical({k: v for k, v in opened.model.state_dict().items() if k in (
        saved := weights(model_file(run, name)))}, saved)
    evaluate.main([str(run), "--checkpoint", name, "--max-sequences", "8", "--json"])
    on_average = json.loads(capsys.readouterr().out)
    evaluate.main([str(run), "--max-sequences", "8", "--json"])
    on_newest = json.loads(capsys.readouterr().out)
    assert on_average["checkpoint"].endswith(name) and on_newest["checkpoint"].endswith("step-00000030")
    assert on_average["loss"] != on_newest["loss"]
    sample.main([str(run), "the", "--checkpoint", name, "--max-new-tokens", "8", "--seed", "1"])
    captured = capsys.readouterr()
    assert captured.out and f"checkpoints/{name} (update 30)" in captured.err
    export.main([str(run), "--checkpoint", name, str(tmp_path / "hf")])
    assert (tmp_path / "hf/model.safetensors").is_file()
    assert f"checkpoints/{name} (update 30)" in capsys.readouterr().err


def test_resume_continues_from_the_newest_step_not_the_average(run, tmp_path, capsys):
    command.main([str(run), "--last", "2"])
    name = "average-00000020-00000030"
    kept = snapshot(run / "checkpoints" / name)
    proc = cli(f"resume={run}", "trainer.max_steps=40", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "step-00000030 at update 30" in proc.stdout + proc.stderr
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step-00000040\n"
    # keep_last=3 pruned step-10 and left the average as it was
    assert [p.name for p in checkpoint.complete(root)] == \
        ["step-00000020", "step-00000030", "step-00000040"]
    assert snapshot(root / name) == kept


def test_a_run_being_written_is_refused(run):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from trainrun import "
         "rundir; rundir.claim(Path(sys.argv[1]), 'x'); print('held', flush=True); "
         "sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = snapshot(run)
        proc = subprocess.run([str(Path(sys.executable).with_name(PROG)), str(run), "--last", "2"],
                              capture_output=True, text=True, timeout=120)
        after = snapshot(run)  # the holder's lock file too, as it was
    finally:
        holder.communicate("", timeout=30)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert err[0].startswith(f"{PROG}: error: RUN_DIR: ") and \
        f"being written by another trainrun process (pid {holder.pid})" in err[0]
    assert after == before


@pytest.mark.parametrize("args, key, words", [
    (["--last", "0"], "--last", "got '0'; allowed: an integer >= 1"),
    (["--last", "-2"], "--last", "got '-2'"),
    (["--last", "two"], "--last", "got 'two'"),
    (["--last", "1.5"], "--last", "got '1.5'"),
    (["--last", "4"], "--last", "has 3 intact checkpoint(s) (step-00000010, step-00000020, "
                                "step-00000030); allowed: 1 <= N <= 3"),
    ([], "arguments", "required: --last"),
    (["--last", "2", "--checkpoint-name", "step-00000099"], "--checkpoint-name", "other than step-N"),
    (["--last", "2", "--checkpoint-name", "latest"], "--checkpoint-name", "got 'latest'"),
    (["--last", "2", "--checkpoint-name", "best"], "--checkpoint-name", "got 'best'"),
    (["--last", "2", "--checkpoint-name", "../elsewhere"], "--checkpoint-name", "got '../elsewhere'"),
    (["--last", "2", "--checkpoint-name", ".tmp-x"], "--checkpoint-name", "got '.tmp-x'"),
], ids=["zero", "negative", "word", "fraction", "more-than-there-are", "no-last",
        "step-name", "latest", "best", "outside", "hidden"])
def test_bad_input_is_one_line_and_writes_nothing(three, capsys, args, key, words):
    before = snapshot(three)
    exits_2(command.main, str(three), *args)
    assert words in one_line(capsys, PROG, f"{key}:")
    assert snapshot(three) == before


def test_a_run_directory_without_checkpoints_and_a_taken_name_are_refused(run, tmp_path, capsys):
    exits_2(command.main, str(tmp_path / "missing"), "--last", "1")
    assert "no such directory" in one_line(capsys, PROG, "RUN_DIR:")
    (tmp_path / "empty").mkdir()
    exits_2(command.main, str(tmp_path / "empty"), "--last", "1")
    assert "no checkpoints/ in it" in one_line(capsys, PROG, "RUN_DIR:")
    assert list((tmp_path / "empty").iterdir()) == []
    (tmp_path / "empty/checkpoints").mkdir()
    exits_2(command.main, str(tmp_path / "empty"), "--last", "1")
    assert "no intact checkpoint" in one_line(capsys, PROG, "RUN_DIR:")
    command.main([str(run), "--last", "3"])
    capsys.readouterr()
    before = snapshot(run)
    exits_2(command.main, str(run), "--last", "3")
    assert "average-00000010-00000030 already exists" in one_line(capsys, PROG, "--checkpoint-name:")
    assert snapshot(run) == before


def write_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    save_file(tensors, str(folder / checkpoint.MODEL_FILE))
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_each_dtype_comes_back_bit_for_bit_and_integers_are_kept(tmp_path, dtype):
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": (torch.randn(64, 33, generator=gen) * 1e3).to(dtype),
               "tiny": (torch.randn(17, generator=gen) * 1e-30).to(dtype),
               "count": torch.arange(5, dtype=torch.int64)}
    folders = [write_weights(tmp_path / str(i), tensors) for i in range(7)]
    mean, _ = average(folders)
    assert_identical(mean, tensors)
    assert {k: v.dtype for k, v in mean.items()} == {k: v.dtype for k, v in tensors.items()}


def test_checkpoints_that_differ_beyond_their_floats_are_refused(tmp_path):
    base = {"w": torch.ones(3), "count": torch.arange(3)}
    one = write_weights(tmp_path / "one", base)
    cases = {"other-integers": {**base, "count": torch.arange(1, 4)},
             "other-shape": {**base, "w": torch.ones(4)},
             "other-dtype": {**base, "w": torch.ones(3, dtype=torch.float64)},
             "other-names": {"w": torch.ones(3)}}
    expected = {"other-integers": "not floating point, so not averaged",
                "other-shape": "(4,)", "other-dtype": "torch.float64",
                "other-names": "count only in"}
    for name, tensors in cases.items():
        with pytest.raises(ConfigError) as error:
            average([one, write_weights(tmp_path / name, tensors)])
        assert error.value.key == "RUN_DIR" and expected[name] in error.value.message, name


def test_checkpoint_takes_best_and_lists_the_other_folders(run, capsys):
    shutil.copytree(run / "checkpoints/step-00000020", run / "checkpoints/best")
    opened = open_run(str(run), [], "best", data=False)
    assert opened.checkpoint == run / "checkpoints/best" and opened.step == 20
    exits_2(sample.main, str(run), "--checkpoint", "average-1-2")
    assert "allowed: step-00000010, step-00000020, step-00000030, best" in \
        one_line(capsys, "trainrun-sample", "--checkpoint:")
