"""`trainrun-nohup` and `trainrun-tmux`: start `trainrun <args>` so that it outlives the SSH
session, and print where it runs and how to follow, stop and resume it, unwrapped and
quoted for the shell, ready to copy.

The arguments are validated first, in the foreground: what trainrun would refuse is
refused here, in one line with exit status 2, and nothing is started. The run directory is
the one trainrun really uses: the run given to `resume=<dir>`, an explicit `hydra.run.dir=`
(or `hydra.sweep.dir=` under -m), or else a new one made here, named by the time as Hydra
would name it (with -1, -2, ... when another run took that second), and passed to trainrun.
The console output goes to console.out there (appended: a resumed run keeps what it
printed before; never through a link)."""

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
    """The directory trainrun will use (made if it is a new one), the arguments that make
    it so, and whether it is a sweep's."""
    from trainrun import rundir

    sweep = any(a in ("-m", "--multirun") for a in args)
    if sweep:
        given = value(args, "hydra.sweep.dir")
        if given:
            return Path(given), args, True
        made = rundir.fresh(Path("multirun"), claimed=False)
        return made, [*args, f"hydra.sweep.dir={made}"], True
    resume = value(args, "resume")
    if resume not in (None, "auto", "null"):
        return Path(resume), args, False
    given = value(args, "hydra.run.dir")
    if given:
        return Path(given), args, False
    made = rundir.fresh(Path("outputs"), claimed=False)
    return made, [*args, f"hydra.run.dir={made}"], False


def validate(prog: str, args: list[str]) -> None:
    """Refuse here, in the foreground, what trainrun would refuse (one line, exit status 2;
    a finished run: its line, exit status 0), and a run directory another process writes
    or that holds a link where trainrun writes; `--help` prints the usage."""
    if any(a in ("-h", "--help") for a in args):
        print(USAGE.format(prog=prog))
        sys.exit(0)
    from trainrun import composition, rundir
    from trainrun.composition.outputs import given_run_dir
    from trainrun.errors import ConfigError
    from trainrun.resume import AlreadyComplete

    composition.prepare_hydra()
    try:
        full = composition.arguments(args)
        composition.preflight(full)
        run_dir = given_run_dir(full)
        if run_dir is not None and run_dir.is_dir():
            rundir.claim(run_dir, "resume" if value(args, "resume") else "hydra.run.dir")
            rundir.release(run_dir)  # free for the job this command starts
    except ConfigError as error:
        composition.fail(error, prog)
    except AlreadyComplete as done:
        print(f"{prog}: {done}", file=sys.stderr)
        sys.exit(0)


USAGE = """usage: {prog} [trainrun's arguments]

Start `trainrun <arguments>` detached from the terminal, so that it outlives the SSH
session; its output goes to console.out in the run directory. The arguments are checked
first: what trainrun would refuse is refused here, and nothing is started. Prints the run
directory and the commands to follow, stop and resume the run (docs/long-jobs.md, Over SSH).
`trainrun --help` lists trainrun's arguments."""


def trainrun_command() -> list[str]:
    """$TRAINRUN (split as the shell would), else trainrun of this environment."""
    if os.environ.get("TRAINRUN"):
        return shlex.split(os.environ["TRAINRUN"])
    return [sys.executable, "-m", "trainrun"]


def resume_hint(run_dir: Path, args: list[str], sweep: bool) -> str:
    from trainrun.composition.command_line import config_dir_args
    from trainrun.sweep import sweep_command

    if sweep:
        return sweep_command(args, run_dir)
    return shlex.join(["trainrun", *config_dir_args(args), f"resume={run_dir}"])


def _ignore_hangup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def console_out(run_dir: Path):
    """run_dir/console.out, appended, never through a link (the directory made if new)."""
    from trainrun import rundir

    run_dir.mkdir(parents=True, exist_ok=True)
    return rundir.append(run_dir / "console.out", within=run_dir, binary=True)


def nohup() -> None:
    args = sys.argv[1:]
    validate("trainrun-nohup", args)
    run_dir, args, sweep = run_directory(args)
    with console_out(run_dir) as out:
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
    validate("trainrun-tmux", args)
    run_dir, args, sweep = run_directory(args)
    console_out(run_dir).close()  # made here, so that tmux's `cat >>` finds a plain file
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
