"""trainer.threads: how many CPU threads torch's operators use (torch.set_num_threads).

torch's own default is one thread per core. On a machine shared with other jobs (an SSH box,
a CI runner) that oversubscribes the cores: each thread waits for the others at every
operator, and a run can take many times longer than with fewer threads. `auto` therefore
takes the cores this process may run on, shares them between the processes of this launch
on this machine, and leaves out the cores that other jobs keep busy (the load average).

A number is bounded by MAX_THREADS, a fixed figure rather than this machine's cores: a
config is validated where it is written (a sweep's submit host, a laptop) and may run on a
larger machine. Past it, starting the threads alone can exhaust memory; more threads than
cores is allowed but said in the log, since it only slows a run down.

On the CPU the thread count changes the bits: operators split their sums between the threads,
and a sum added in another order rounds differently. A checkpoint therefore records the count
its run used (meta.json's `reproducibility`), and a resume under `auto` takes that count
rather than one chosen from today's load, so that it stays on the uninterrupted run's
trajectory; a number given on the resume wins, with a warning that the bits will differ."""

from __future__ import annotations

import os

from trainrun.errors import ConfigError

MAX_THREADS = 1024  # above the cores of the largest machines (2 x 192 cores x 2 threads)


def check(key: str, value: str) -> None:
    if value == "auto":
        return
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_THREADS or str(n) != str(value).strip():
        raise ConfigError(key, f"got {value!r}; allowed: auto, or a whole number of threads "
                               f"from 1 to {MAX_THREADS}")


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def choose(value: str) -> tuple[int, str]:
    """The number of threads for trainer.threads=value, and why (for the log)."""
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
    if value != "auto":
        n = cores()
        more = (f"; more than the {n} core(s) this process may run on, so they wait for "
                f"each other" if int(value) > n else "")
        return int(value), f"trainer.threads={value}{more}"
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0:
        return int(omp), f"auto: OMP_NUM_THREADS={omp}"
    n = cores()
    share = max(1, n // max(1, local_processes))
    try:
        others = os.getloadavg()[0]
    except (AttributeError, OSError):
        others = 0.0
    free = max(1, min(share, n - round(others)))
    why = f"auto: {n} core(s)"
    if local_processes > 1:
        why += f" shared by {local_processes} processes"
    if free < share:
        why += f", about {round(others)} busy with other work (load average {others:.1f})"
    return free, why + "; trainer.threads=N to choose"


def resumed(value: str, recorded: int) -> tuple[int, str, bool]:
    """The number of threads of a resume whose checkpoint was trained with `recorded`, why,
    and whether that is a warning: `auto` takes the recorded count; a number other than it
    is used, and said to end bit-exactness."""
    if value == "auto":
        now, _ = choose("auto")
        why = "the checkpoint's, for a bit-exact resume under trainer.threads=auto"
        if now != recorded:
            why += (f"; auto would choose {now} here: trainer.threads={now} to use that, "
                    f"and the run will then not be bit-identical to an uninterrupted one")
        return recorded, why, False
    n, why = choose(value)
    if n == recorded:
        return n, why + ", as the checkpoint was trained", False
    return n, (f"{why}; the checkpoint was trained with {recorded}: the resumed run will not "
               f"be bit-identical to an uninterrupted one (trainer.threads=auto keeps "
               f"{recorded})"), True


def set_threads(value: str, recorded: int | None = None) -> tuple[str, bool]:
    """Set torch's thread count from trainer.threads=value, or on a resume from the count the
    checkpoint recorded (`resumed`); return the line that logs it and whether that line is a
    warning."""
    import torch

    if recorded is None:
        (n, why), warn = choose(value), False
    else:
        n, why, warn = resumed(value, recorded)
    torch.set_num_threads(n)
    return f"{n} CPU thread(s) ({why})", warn
