"""A run directory as trainrun writes it: one process at a time, never through a link.

A run directory is data (docs/long-jobs.md, What a run directory is trusted for). Before a run reads
or writes one, `check` refuses a symbolic link or anything but a plain file or folder where
trainrun reads, writes or deletes (the entries of WRITTEN, and everything inside its
folders); `claim` takes the directory's lock file for as long as the process writes it; and
the writes themselves (`write`, `append`, `folder`) open every component below the run
directory without following a link, so a link made while the run runs is not followed
either. The run directory itself is the path the user named, followed as given.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from itertools import count
from pathlib import Path

from trainrun import signals
from trainrun.errors import ConfigError

LOCK = ".trainrun.lock"
# The entries trainrun writes in a run directory: files, and folders it writes inside.
FILES = ("train.log", "env.json", "metrics.json", "tokenizer.json", "console.out",
         "trackers.json", LOCK)
FOLDERS = (".hydra", "checkpoints", "tb")
APPENDED = ("train.log", "console.out")  # written in place: a hard link would be written too
TRUSTED = "docs/long-jobs.md \"What a run directory is trusted for\""

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def written(name: str) -> bool:
    """Whether trainrun writes the top-level entry `name` (or a temporary file of one)."""
    return name in FILES or name in FOLDERS or any(
        name.startswith(f".{base}.tmp") for base in FILES)


def unsafe(run_dir: Path) -> tuple[Path, str] | None:
    """The first entry of run_dir where trainrun writes that is a link or not a plain file
    or folder, and what it is; None when there is none (or no run_dir yet)."""
    try:
        names = sorted(os.listdir(run_dir))
    except (FileNotFoundError, NotADirectoryError):
        return None
    for name in filter(written, names):
        path = run_dir / name
        problem = _kind(path)
        if problem is None and name in APPENDED and path.is_file() and path.lstat().st_nlink > 1:
            problem = "a file with another hard link (it would be written too)"
        if problem is not None:
            return path, problem
        if name in FOLDERS:
            found = _inside(path)
            if found is not None:
                return found
    return None


def _kind(path: Path) -> str | None:
    """What is wrong with the entry at path: a link, or neither a plain file nor a folder.
    (A folder where a file goes, or the reverse, is no way out of the run directory: the
    write that meets it fails.)"""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return f"a symbolic link (to {os.readlink(path)})"
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    return "not a plain file or folder (a pipe, socket or device)"


def _inside(top: Path) -> tuple[Path, str] | None:
    for folder, dirs, files in os.walk(top):  # lists links as entries, never follows them
        for name in sorted([*dirs, *files]):
            problem = _kind(Path(folder, name))
            if problem is not None:
                return Path(folder, name), problem
    return None


def check(run_dir: Path, key: str) -> None:
    """Refuse (ConfigError on `key`) a run directory with a link or a special file where
    trainrun reads or writes, naming the entry; nothing is read or written before."""
    found = unsafe(run_dir)
    if found is not None:
        path, problem = found
        raise ConfigError(key, f"{path} is {problem}; trainrun follows no link in a run "
                               f"directory ({TRUSTED}); allowed: a run directory with plain "
                               f"files and folders there (nothing was run or written)")


def check_job(job_dir: Path, sweep_dir: Path) -> None:
    """Refuse a sweep job's folder that is a link (a sweep directory is data too)."""
    if job_dir.is_symlink():
        raise ConfigError("hydra.sweep.dir", f"{job_dir} is a symbolic link (to "
                                             f"{os.readlink(job_dir)}); trainrun follows no "
                                             f"link in {sweep_dir} ({TRUSTED}); allowed: a "
                                             f"sweep directory whose jobs are folders")


def _open_folder(folder: Path, within: Path) -> int:
    """A descriptor of `folder`, opened from `within` one component at a time, none of them
    followed if it is a link (OSError ELOOP or ENOTDIR)."""
    fd = os.open(within, _DIR)
    for part in _below(folder, within):
        try:
            inner = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = inner
    return fd


def _below(path: Path, within: Path) -> tuple[str, ...]:
    """The components of `path` below `within` (either may be relative to the working
    directory)."""
    return Path(os.path.abspath(path)).relative_to(os.path.abspath(within)).parts


def folder(path: Path, within: Path) -> None:
    """Make the folder `path` and the missing ones above it, up to `within`, never through
    a link."""
    fd = os.open(within, _DIR)
    try:
        for part in _below(path, within):
            try:
                os.mkdir(part, dir_fd=fd)
            except FileExistsError:
                pass
            inner = os.open(part, _DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def write(path: Path, data: str | bytes, within: Path, sync: bool = False) -> None:
    """Replace the file at `path` with `data` atomically (a new file, then a rename), never
    writing through a link or into another hard link of it; `sync`: fsynced first. On any
    error (a full disk) the temporary file is removed and the old file is as it was."""
    fd = _open_folder(path.parent, within)
    tmp = f".{path.name}.tmp-{os.getpid()}"
    try:
        _unlink(tmp, fd)
        out = os.open(tmp, _NEW, 0o666, dir_fd=fd)
        try:
            with open(out, "wb", closefd=True) as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path.name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException as error:
            _unlink(tmp, fd)
            if isinstance(error, OSError) and error.filename is None:
                error.filename = str(path)  # named in the one line a full disk gives
            raise
    finally:
        os.close(fd)


def append(path: Path, within: Path, binary: bool = False):
    """The file at `path` opened for appending (made if missing), never through a link, a
    pipe or another hard link of it."""
    fd = _open_folder(path.parent, within)
    try:
        out = os.open(path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW |
                      os.O_NONBLOCK | os.O_CLOEXEC, 0o666, dir_fd=fd)
    finally:
        os.close(fd)
    info = os.fstat(out)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(out)
        raise OSError(errno.EPERM, "not a plain file of its own", str(path))
    fcntl.fcntl(out, fcntl.F_SETFL, fcntl.fcntl(out, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return open(out, "ab") if binary else open(out, "a", encoding="utf-8")


def fsync(path: Path) -> None:
    """Flush a file's or a folder's entries to the disk (a folder: the renames in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(name: str, fd: int) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass


@dataclass
class Claim:
    """This process's hold on a run directory: its lock file, locked (flock) and naming
    this process, until `release()` or the process's end. `made`: this claim made the
    folder (a fresh run's), so a start refused or stopped removes it again."""

    path: Path
    fd: int
    made: bool = False

    def release(self) -> None:
        """Unlock, and remove the lock file (it is this claim's own: a process that opened
        it meanwhile finds it gone and makes a new one)."""
        if self.fd < 0:
            return
        _held.pop(_id(self.path), None)
        try:
            folder_fd = os.open(self.path, _DIR)
            try:
                if os.stat(LOCK, dir_fd=folder_fd, follow_symlinks=False).st_ino == \
                        os.fstat(self.fd).st_ino:
                    os.unlink(LOCK, dir_fd=folder_fd)
            finally:
                os.close(folder_fd)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


_held: dict[str, Claim] = {}


def _id(path: Path) -> str:
    return os.path.realpath(path)


def claim(run_dir: Path, key: str, made: bool = False) -> Claim:
    """Lock run_dir for this process (again: the claim it holds), making it if it is
    missing. Another process holding it: ConfigError on `key` naming that process's pid."""
    with signals.deferred():  # a stop meanwhile finds the claim recorded, and undoes it
        return _claim(run_dir, key, made)


def _claim(run_dir: Path, key: str, made: bool) -> Claim:
    held = _held.get(_id(run_dir))
    if held is not None:
        return held
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        made = True
    check(run_dir, key)
    while True:
        fd = _open_lock(run_dir)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(key, f"{run_dir} is being written by another trainrun process "
                                   f"(pid {holder}); one process writes a run directory at a "
                                   f"time; allowed: wait until it ends (or stop it: kill -TERM "
                                   f"{holder}), or another directory") from None
        if _still_there(run_dir, fd):
            break
        os.close(fd)  # released and removed while this process waited: take the new one
    try:  # the pid, for the message another process gets (not needed for the lock)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    _held[_id(run_dir)] = found = Claim(run_dir, fd, made)
    return found


def _open_lock(run_dir: Path) -> int:
    folder_fd = os.open(run_dir, _DIR)
    try:
        fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK |
                     os.O_CLOEXEC, 0o644, dir_fd=folder_fd)
    finally:
        os.close(folder_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EPERM, "not a plain file", str(run_dir / LOCK))
    return fd


def _still_there(run_dir: Path, fd: int) -> bool:
    try:
        return os.stat(run_dir / LOCK, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def release(run_dir: Path) -> Claim | None:
    """Release this process's claim on run_dir, if it holds one; return it."""
    held = _held.get(_id(run_dir))
    if held is not None:
        held.release()
    return held


def abandon() -> None:
    """Release every claim (the process ends); remove the folders they made that are still
    empty (a fresh run refused or stopped before it wrote anything)."""
    for held in list(_held.values()):
        held.release()
        if held.made:
            remove_if_empty(held.path)


atexit.register(abandon)


def fresh(base: Path, claimed: bool = True) -> Path:
    """A new run directory base/<date>/<time>, made (and claimed) by this process; a second
    run started in the same second gets <time>-1, the next <time>-2, and so on."""
    now = datetime.now()
    day = base / now.strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    for n in count():
        path = day / (now.strftime("%H-%M-%S") + (f"-{n}" if n else ""))
        with signals.deferred():  # made and claimed as one step
            try:
                path.mkdir()
            except FileExistsError:
                continue
            if claimed:
                _claim(path, "hydra.run.dir", made=True)
        return path
    raise AssertionError("unreachable")


# The nearest folder above the run directory that existed before `trainrun` started, which
# the command records (trainrun.composition.outputs): everything made below it is this run's.
MADE_UNDER = "TRAINRUN_MADE_UNDER"


def remove_if_empty(run_dir: Path) -> None:
    """Remove a run directory left empty (made before the run was built), and the empty
    folders made above it (outputs/<date>/): up to the folder recorded in
    $TRAINRUN_MADE_UNDER, or else up to the working directory; never that folder itself."""
    top = Path(os.environ.get(MADE_UNDER) or Path.cwd()).resolve()
    path = run_dir.resolve()
    while path != top and top in path.parents:
        try:
            path.rmdir()  # only an empty directory
        except OSError:
            return
        path = path.parent
