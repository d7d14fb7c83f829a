"""`trainrun-nohup` and `trainrun-tmux`: start `trainrun <args>` so that it outlives the SSH
session, and print where it runs and how to follow, stop and resume it, unwrapped and
quoted for the shell, ready to copy.

The run directory is the one trainrun really uses: the run given to `resume=<dir>`, an
explicit `hydra.run.dir=` (or `hydra.sweep.dir=` under -m), or else one fixed here by the
time and passed to trainrun, as Hydra would have named it. The console output goes to
console.out there (appended: a resumed run keeps what it printed before)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path


def value(args: list[str], key: str) -> str | None:
    """The last `key=value` among args, unquoted as the shell would have left it."""
    found = [a.split("=", 1)[1] for a in args if a.split("=", 1)[0] == key]
    return found[-1].strip("'\"") if found else None


def run_directory(args: list[str]) -> tuple[Path, list[str], bool]:
    """The directory trainrun will use, the arguments that make it so, and whether it is
    a sweep's."""
    sweep = any(a in ("-m", "--multirun") for a in args)
    stamp = datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    if sweep:
        given = value(args, "hydra.sweep.dir")
        return (Path(given), args, True) if given else \
            (Path("multirun", stamp), [*args, f"hydra.sweep.dir=multirun/{stamp}"], True)
    resume = value(args, "resume")
    if resume not in (None, "auto", "null"):
        return Path(resume), args, False
    given = value(args, "hydra.run.dir")
    if given:
        return Path(given), args, False
    return Path("outputs", stamp), [*args, f"hydra.run.dir=outputs/{stamp}"], False


def trainrun_command() -> list[str]:
    """$TRAINRUN (split as the shell would), else trainrun of this environment."""
    if os.environ.get("TRAINRUN"):
        return shlex.split(os.environ["TRAINRUN"])
    return [sys.executable, "-m", "trainrun"]


def sweep_command(args: list[str], sweep_dir: Path) -> str:
    """The command that continues a whole sweep: the same one with resume=auto and its
    sweep directory; finished jobs are skipped, stopped ones resumed (README "Sweeps")."""
    kept = [a for a in args if a.split("=", 1)[0] not in ("resume", "hydra.sweep.dir")]
    return shlex.join(["trainrun", *kept, "resume=auto", f"hydra.sweep.dir={sweep_dir}"])


def config_dir(args: list[str]) -> list[str]:
    """The `--config-dir DIR` (-cd) among args, which a resume must be given again."""
    found = []
    for i, arg in enumerate(args):
        if arg.partition("=")[0] in ("--config-dir", "-cd"):
            found = [arg] if "=" in arg else args[i:i + 2]
    return found


def resume_hint(run_dir: Path, args: list[str], sweep: bool) -> str:
    if sweep:
        return sweep_command(args, run_dir)
    return shlex.join(["trainrun", *config_dir(args), f"resume={run_dir}"])


def _ignore_hangup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def nohup() -> None:
    args = sys.argv[1:]
    run_dir, args, sweep = run_directory(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "console.out", "ab") as out:
        proc = subprocess.Popen([*trainrun_command(), *args], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_ignore_hangup)
    log = run_dir / ("*/train.log" if sweep else "train.log")
    print("\n".join([
        f"run directory: {run_dir}",
        f"pid:           {proc.pid}",
        f"console:       tail -f {shlex.quote(str(run_dir / 'console.out'))}",
        f"follow:        tail -f {shlex.quote(str(log)) if not sweep else str(log)}",
        f"stop:          kill -TERM {proc.pid}      (finishes the update, writes a "
        f"checkpoint, exits 143)",
        f"resume:        {resume_hint(run_dir, args, sweep)}",
    ]))


def tmux() -> None:
    args = sys.argv[1:]
    run_dir, args, sweep = run_directory(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    session = os.environ.get("TRAINRUN_SESSION", f"trainrun-{stamp}")
    command = (f"{shlex.join([*trainrun_command(), *args])}; "
               f"echo \"trainrun exited with status $?\"; exec \"${{SHELL:-sh}}\"")
    console = shlex.quote(str(run_dir.resolve() / "console.out"))
    try:
        subprocess.run(["tmux", "new-session", "-d", "-s", session, "-c", os.getcwd(), command],
                       check=True)
        # the pane stays a terminal (progress bar); its output is also kept in console.out
        subprocess.run(["tmux", "pipe-pane", "-t", session, "-o", f"cat >> {console}"],
                       check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"trainrun-tmux: error: tmux: {exc}", file=sys.stderr)
        sys.exit(1)
    log = run_dir / ("*/train.log" if sweep else "train.log")
    print("\n".join([
        f"run directory: {run_dir}",
        f"tmux session:  {session}",
        f"attach:        tmux attach -t {session}      (detach again with Ctrl-b d)",
        f"follow:        tail -f {shlex.quote(str(log)) if not sweep else str(log)}",
        f"stop:          tmux send-keys -t {session} C-c      (checkpoint, then exit 130)",
        f"resume:        {resume_hint(run_dir, args, sweep)}",
    ]))
