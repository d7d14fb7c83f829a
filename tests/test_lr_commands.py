"""The companion commands of docs/schedules.md: `trainrun-lr` (the schedule of a config, without
model or data) and `trainrun-lrfind` (the learning-rate range test), as real processes on
the default config (lrfind on a tiny model, for time), plus their pieces in-process."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, config

from trainrun import lrfind, lrpreview
from trainrun.commands import lr as lr_command
from trainrun.commands import lrfind as lrfind_command
from trainrun.distributed import Replicas
from trainrun.errors import ConfigError
from trainrun.schedules import SCHEDULES, build_schedule

MODULES = {"trainrun-lr": "trainrun.commands.lr", "trainrun-lrfind": "trainrun.commands.lrfind"}


def command(name: str, *args: str, cwd: Path, timeout: float = 300):
    """Run the real console script `name` in a subprocess."""
    exe = Path(sys.executable).with_name(name)
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", MODULES[name]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def summary_row(stdout: str, label: str) -> list[str]:
    """first, peak, at, final, updates of the summary line of `label`."""
    line = next(line for line in stdout.splitlines() if line.startswith(label + " "))
    return line.split()[1:]


# --- trainrun-lr --------------------------------------------------------------------------

@pytest.mark.slow
def test_preview_of_the_default_config(tmp_path: Path):
    result = command("trainrun-lr", "out=preview", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = config()  # the inputs: base, N, the cosine keys
    base, n, s = cfg.optimizer.lr, cfg.trainer.max_steps, cfg.scheduler
    w = round(s.warmup_ratio * n)
    expected = [base * k / w if k <= w else
                s.min_lr + (base - s.min_lr) * (1 + math.cos(math.pi * (k - w - 1) / (n - w))) / 2
                for k in range(1, n + 1)]
    first, peak, at, final, updates = summary_row(result.stdout, "scheduler=cosine")
    assert (first, peak, at, final, updates) == (
        f"{expected[0]:.3e}", f"{max(expected):.3e}", str(w), f"{expected[-1]:.3e}", str(n))
    assert "(update k)" in result.stdout and "* scheduler=cosine" in result.stdout  # the plot
    header, rows = read_csv(tmp_path / "preview" / "lr.csv")
    assert header == ["k", "lr"]
    assert [int(r[0]) for r in rows] == list(range(1, n + 1))
    for (k, lr), x in zip(rows, expected, strict=True):
        assert abs(float(lr) - x) <= 1e-9 * x, f"lr.csv at k={k}"
    assert (tmp_path / "preview" / "lr.png").read_bytes().startswith(b"\x89PNG")
    assert not (tmp_path / "outputs").exists()  # no run directory


@pytest.mark.slow
def test_preview_sweep_of_every_schedule(tmp_path: Path):
    options = list(SCHEDULES)
    result = command("trainrun-lr", "-m", f"scheduler={','.join(options)}", "out=sweep",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header, rows = read_csv(tmp_path / "sweep" / "lr.csv")
    assert header == ["k", *(f"scheduler={o}" for o in options)]
    assert len(rows) == 500 and all(len(r) == len(header) for r in rows)
    for option in options:
        summary_row(result.stdout, f"scheduler={option}")
    assert "scheduler=noam: optimizer.lr=" in result.stdout and "is not used" in result.stdout
    assert "scheduler=plateau: its reductions depend on val/loss" in result.stdout
    noam = config("scheduler=noam")  # d_model defaults to the model's
    s, d, w = noam.scheduler, noam.model.d_model, noam.scheduler.warmup_steps
    column = header.index("scheduler=noam")
    for row in rows:
        k = int(row[0])
        x = s.scale * d ** -0.5 * min(k ** -0.5, k * w ** -1.5)
        assert abs(float(row[column]) - x) <= 1e-9 * x
    assert (tmp_path / "sweep" / "lr.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("args, key", [
    (["scheduler.warmup_ratio=null", "scheduler.warmup_steps=500"], "scheduler.warmup_steps"),
    (["scheduler=multistep", "scheduler.milestones=[300,200]"], "scheduler.milestones"),
    (["scheduler=onecycle", "scheduler.warmup_steps=10"], "scheduler.warmup_steps"),
    (["scheduler=cosine,noam"], "scheduler"),  # a sweep needs -m
    (["scheduler=nope"], "scheduler"),
    (["scheduler.bogus=1"], "scheduler.bogus"),
])
def test_preview_rejects_bad_input_with_one_line(args, key, tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as exit_:
        lr_command.main([*args, f"out={tmp_path / 'out'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"trainrun-lr: error: {key}: ")
    assert not (tmp_path / "out").exists()


def test_preview_reads_overrides_as_trainrun_does(capsys):
    """One warmup key on the command line replaces the option's other one (trainrun.composition)."""
    lr_command.main(["scheduler.warmup_steps=10", "trainer.max_steps=100"])
    first, peak, at, final, updates = summary_row(capsys.readouterr().out, "scheduler=cosine")
    assert (at, updates) == ("10", "100") and float(first) == pytest.approx(float(peak) / 10)


def test_preview_plot_marks_every_curve():
    curves = [lrpreview.Curve("a", lambda k: 1.0, 10),
              lrpreview.Curve("b", lambda k: 0.1 * (k - 1), 10, peaks=[10])]
    text = lrpreview.ascii_plot(curves, width=20, height=5)
    lines = text.splitlines()
    assert lines[0].startswith(" 1.00e+00 |*") and lines[4].startswith(" 0.00e+00 |o")
    assert lines[-1] == "* a  o b"


PEAKS = [  # settings where the peak sits somewhere else, or is reached more than once
    [], ["scheduler.warmup_ratio=null", "scheduler.warmup_steps=0"],
    ["scheduler.warmup_ratio=null", "scheduler.warmup_steps=7"],
    ["scheduler=constant"], ["scheduler=constant", "scheduler.warmup_ratio=null"],
    ["scheduler=step", "scheduler.step_size=3"], ["scheduler=multistep"],
    ["scheduler=exponential"], ["scheduler=cosine", "scheduler.min_lr=0.003"],
    ["scheduler=cosine_restarts", "scheduler.T_0=10", "scheduler.cycle_decay=1"],
    ["scheduler=cosine_restarts", "scheduler.T_0=7", "scheduler.T_mult=2"],
    ["scheduler=onecycle"], ["scheduler=onecycle", "scheduler.pct_start=0.337"],
    ["scheduler=onecycle", "scheduler.three_phase=true", "scheduler.anneal_strategy=linear"],
    ["scheduler=onecycle", "scheduler.div_factor=1"],
    ["scheduler=linear", "scheduler.min_lr=0.001"],
    ["scheduler=polynomial", "scheduler.cycle=true", "scheduler.decay_steps=50"],
    ["scheduler=noam"], ["scheduler=noam", "scheduler.warmup_steps=5000"],
    ["scheduler=inverse_sqrt", "scheduler.warmup_steps=33"],
    ["scheduler=wsd"], ["scheduler=wsd", "scheduler.decay_steps=null",
                        "scheduler.decay_ratio=1.0", "scheduler.warmup_ratio=null"],
    ["scheduler=plateau"],
]


@pytest.mark.parametrize("n", [997, 1000])
@pytest.mark.parametrize("overrides", PEAKS, ids=lambda o: " ".join(o) or "default")
def test_the_summary_found_at_the_peak_candidates_is_that_of_every_update(overrides, n):
    """The reference: lr(k) at every update, its max and the first k where it occurs."""
    c = lrpreview.curve("", config(*overrides, f"trainer.max_steps={n}"))
    every = [c.lr(k) for k in range(1, n + 1)]
    assert c.peak == (max(every), every.index(max(every)) + 1)
    assert (c.first, c.final, c.n) == (every[0], every[-1], n)
    ks, rates = c.points(50)
    assert ks[0] == 1 and ks[-1] == n and c.peak[1] in ks and len(ks) <= 51
    assert rates == [every[k - 1] for k in ks]


def test_a_preview_of_10_to_the_11_updates_is_bounded_and_exact(tmp_path: Path):
    """No list of every rate: the process ends (the timeout only guards the test run), lr.csv
    is bounded, and the summary's figures are the schedule's own at the updates it names."""
    n = 10**11
    result = command("trainrun-lr", "-m", "scheduler=cosine,onecycle,noam",
                     f"trainer.max_steps={n}", "out=big", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    header, rows = read_csv(tmp_path / "big" / "lr.csv")
    assert lrpreview.CSV_POINTS <= len(rows) <= lrpreview.CSV_POINTS + 9
    assert int(rows[0][0]) == 1 and int(rows[-1][0]) == n
    assert f"of the {n:,} updates, evenly spread" in result.stdout
    for option in ("cosine", "onecycle", "noam"):
        cfg = config(f"scheduler={option}", f"trainer.max_steps={n}")
        schedule = build_schedule(cfg.scheduler, cfg.optimizer.lr, n, cfg.model.d_model)
        first, peak, at, final, updates = summary_row(result.stdout, f"scheduler={option}")
        assert (first, final, updates) == (f"{schedule(1):.3e}", f"{schedule(n):.3e}", str(n))
        assert peak == f"{schedule(int(at)):.3e}"
        column = [float(r[header.index(f"scheduler={option}")]) for r in rows]
        assert max(column) <= schedule(int(at)) and schedule(int(at) - 1) < schedule(int(at))
    assert (tmp_path / "big" / "lr.png").read_bytes().startswith(b"\x89PNG")
    result = command("trainrun-lr", "trainer.max_steps=1e11", cwd=tmp_path)  # a float: refused
    assert result.returncode == 2 and result.stderr.startswith(
        "trainrun-lr: error: trainer.max_steps: ") and result.stderr.count("\n") == 1


# --- trainrun-lrfind ----------------------------------------------------------------------

@pytest.mark.slow
def test_lrfind_writes_its_curve_and_no_run(tmp_path: Path, corpus: Path):
    start, end, n = 1e-5, 10.0, 30
    result = command("trainrun-lrfind", *TINY, "data=text", f"data.files={corpus}",
                     f"lrfind.start_lr={start}", f"+lrfind.end_lr={end}",
                     f"lrfind.num_updates={n}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (folder,) = (tmp_path / "lrfind").iterdir()  # the default: lrfind/<date>_<time>/
    assert sorted(p.name for p in folder.iterdir()) == ["lrfind.csv", "lrfind.log", "lrfind.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lrfind"]  # no run dir, no checkpoint
    header, rows = read_csv(folder / "lrfind.csv")
    assert header == ["update", "lr", "loss", "smoothed_loss"]
    assert 2 <= len(rows) <= n
    lrs, losses, smoothed = ([float(r[i]) for r in rows] for i in (1, 2, 3))
    for i, lr in enumerate(lrs):
        x = start * (end / start) ** (i / (n - 1))
        assert abs(lr - x) <= 1e-9 * x
    avg = 0.0
    for i, (loss, s) in enumerate(zip(losses, smoothed, strict=True)):  # EMA, beta 0.9
        avg = 0.9 * avg + 0.1 * loss
        assert math.isclose(s, avg / (1 - 0.9 ** (i + 1)), rel_tol=1e-9)
    if len(rows) < n:  # stopped early: only on divergence
        assert smoothed[-1] > 4 * min(smoothed) and all(
            s <= 4 * min(smoothed[:i + 1]) for i, s in enumerate(smoothed[:-1]))
    suggested = float(re.search(r"suggested lr: (\S+)", result.stdout).group(1))
    assert any(math.isclose(suggested, lr, rel_tol=5e-3) for lr in lrs)
    assert (folder / "lrfind.png").read_bytes().startswith(b"\x89PNG")


def test_lrfind_under_fp16_goes_on_past_a_loss_scale_overflow(tmp_path: Path, corpus: Path):
    """The first update's loss scale overflows fp16 (the scaler backs off, as in training):
    an ordinary skip, not the end of the test."""
    result = command("trainrun-lrfind", *TINY, "data=text", f"data.files={corpus}",
                     "precision=fp16", "precision.init_scale=3e38",
                     "precision.backoff_factor=3e-36", "lrfind.num_updates=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (folder,) = (tmp_path / "lrfind").iterdir()
    header, rows = read_csv(folder / "lrfind.csv")
    assert [int(r[0]) for r in rows] == list(range(2, 9))  # update 1 skipped, none after
    assert "completed all 8 updates" in result.stdout


@pytest.mark.parametrize("args, key", [
    (["lrfind.start_lr=0"], "lrfind.start_lr"),
    (["lrfind.start_lr=1e-3", "lrfind.end_lr=1e-4"], "lrfind.end_lr"),
    (["lrfind.num_updates=1"], "lrfind.num_updates"),
    (["lrfind.smoothing=1"], "lrfind.smoothing"),
    (["lrfind.diverge=0.5"], "lrfind.diverge"),
    (["lrfind.speed=2"], "lrfind.speed"),
    (["lrfind.end_lr=ten"], "lrfind.end_lr"),
    (["scheduler.warmup_ratio=null", "scheduler.warmup_steps=500"], "scheduler.warmup_steps"),
])
def test_lrfind_rejects_bad_input_before_any_work(args, key, tmp_path: Path, capsys,
                                                  monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        lrfind_command.main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"trainrun-lrfind: error: {key}: ")
    assert list(tmp_path.iterdir()) == []


def test_smoothing_is_a_bias_corrected_moving_average():
    losses = [5.0, 4.0, 4.5, 3.0, 3.5]
    for i, s in enumerate(lrfind.smooth(losses, 0.8)):
        weights = [0.2 * 0.8 ** (i - j) for j in range(i + 1)]
        expected = sum(w * x for w, x in zip(weights, losses, strict=False)) / sum(weights)
        assert math.isclose(s, expected, rel_tol=1e-12)


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]  # 1e-6 .. 1
    # falls fastest at lr = 1e-3 (log10 = -3), minimal at 1e-1, then rises steeply
    loss = [5 - 2 * math.tanh(2 * (math.log10(lr) + 3)) + (50 * (math.log10(lr) + 1) ** 2
            if lr > 0.1 else 0) for lr in lrs]
    i = lrfind.suggest(lrs, loss)
    assert abs(math.log10(lrs[i]) + 3) <= 6 / 99  # within one grid point of 1e-3


def test_range_test_stops_when_the_smoothed_loss_diverges(monkeypatch):
    from trainrun import loop
    from trainrun.update import UpdateResult

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    class FakeTrainer:
        pass

    trainer = FakeTrainer()
    trainer.replicas, trainer.optimizer = Replicas(model), optimizer
    trainer.schedule = SimpleNamespace(base_lr=1.0)
    seen = []

    def fake_update(t):
        lr = t.optimizer.param_groups[0]["lr"]
        seen.append(lr)
        loss = torch.tensor(2.0 if lr < 1e-2 else 2.0 * (lr / 1e-2) ** 2)
        zero = torch.zeros(())
        return UpdateResult(loss, zero, zero, True), 1

    monkeypatch.setattr(loop, "one_update", fake_update)
    test = lrfind.RangeTest(start_lr=1e-6, end_lr=1.0, num_updates=61, smoothing=0.5)
    result = lrfind.range_test(trainer, test)
    assert seen == result.lrs and len(result.lrs) < 61
    assert result.smoothed[-1] > 4 * min(result.smoothed)
    assert all(s <= 4 * min(result.smoothed[:i + 1]) for i, s in enumerate(result.smoothed[:-1]))
    assert "smoothed loss" in result.stopped


def test_range_test_stops_on_a_non_finite_loss(monkeypatch):
    from trainrun import loop
    from trainrun.update import UpdateResult

    class FakeTrainer:
        replicas = Replicas(torch.nn.Linear(2, 1))
        optimizer = torch.optim.SGD(replicas.module.parameters(), lr=1.0)
        schedule = SimpleNamespace(base_lr=1.0)

    def fake_update(t):
        lr = t.optimizer.param_groups[0]["lr"]
        zero = torch.zeros(())
        return UpdateResult(torch.tensor(math.inf if lr > 1e-3 else 1.0), zero, zero, True), 1

    monkeypatch.setattr(loop, "one_update", fake_update)
    result = lrfind.range_test(FakeTrainer(), lrfind.RangeTest(1e-6, 1.0, 61))
    assert max(result.lrs) <= 1e-3 and "not finite" in result.stopped


def test_range_test_keys_are_checked():
    with pytest.raises(ConfigError):
        lrfind.RangeTest(start_lr=-1.0).validate()
