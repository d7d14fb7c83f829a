"""Whether data files are text in their encoding: found before `datasets` reads them, so
that a Latin-1 or binary file is one line naming the file and the first bad byte instead
of a `UnicodeDecodeError` from deep inside a `datasets` builder.

Each file is streamed in blocks through an incremental decoder, so memory does not grow
with the file; offsets are absolute, 0-based byte offsets into the file. Only regular files
(or links to them) are read: a named pipe would block the check forever, a device never end.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import stat
from collections.abc import Iterable
from typing import BinaryIO

from trainrun.errors import ConfigError

BLOCK_SIZE = 1 << 20  # bytes read at a time
KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
         (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"))


class NotRegular(OSError):
    """A data file that is not a regular file: `kind` says what it is."""

    def __init__(self, path: str | os.PathLike, kind: str):
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind


def kind(mode: int) -> str | None:
    """What a file of st_mode `mode` is, if not a regular file (None for one)."""
    return next((name for test, name in KINDS if test(mode)), None if stat.S_ISREG(mode)
                else "not a regular file")


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for reading in binary if it is a regular file (or a link to one), else
    NotRegular. The open itself does not block (a named pipe without a writer would), and
    what is checked is what was opened, so a file swapped for a pipe meanwhile is caught."""
    found = kind(os.stat(path).st_mode)  # a device is never opened
    if found is not None:
        raise NotRegular(path, found)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        found = kind(os.fstat(fd).st_mode)
        if found is not None:
            raise NotRegular(path, found)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def require_regular(key: str, paths: Iterable[str | os.PathLike], allowed: str) -> None:
    """ConfigError on `key` for the first of `paths` that is not a regular file."""
    for path in paths:
        found = kind(os.stat(path).st_mode)
        if found is not None:
            raise ConfigError(key, f"{path} is {found}, not a regular file; allowed: {allowed}")


def check_encoding(key: str, encoding: str) -> None:
    """`encoding` names a codec that decodes bytes to text (not e.g. base64 or rot13)."""
    try:
        codecs.getincrementaldecoder(encoding)  # LookupError: no such codec
        b"x".decode(encoding, "ignore")  # LookupError: base64, rot13, ... (not of bytes to text)
    except (LookupError, UnicodeError):  # UnicodeError: codecs that decode nothing (undefined)
        raise ConfigError(key, f"got {encoding!r}, which is not a text codec; allowed: a "
                               f"Python codec name such as utf-8, latin-1, cp1252, utf-16") from None


def first_bad_byte(path: str | os.PathLike, encoding: str = "utf-8",
                   block_size: int = BLOCK_SIZE, digest=None) -> tuple[int, str] | None:
    """(offset, what) of the first byte that keeps the file from being text in `encoding`,
    or None when it all is.

    A bad byte is one the codec cannot decode (or the start of a sequence the file ends
    in the middle of), or, in encodings where the NUL character is the byte 0x00 (UTF-8 and
    every ASCII superset), a 0x00: text files have none, binary files mostly do. A path
    that is not a regular file raises NotRegular. `digest` (a hashlib object), if given, is
    fed every byte read: the check reads the whole file anyway.
    """
    decoder = codecs.getincrementaldecoder(encoding)()
    nul_is_zero = "\0".encode(encoding) == b"\0"
    start = 0  # offset of the block's first byte
    with open_regular(path) as f:
        while True:
            block = f.read(block_size)
            if digest is not None:
                digest.update(block)
            nul = block.find(b"\0") if nul_is_zero else -1
            # the decoder may hold the first bytes of a character cut by the block's end;
            # its state's first item is those bytes (codecs.IncrementalDecoder.getstate)
            pending = len(decoder.getstate()[0])
            try:  # the text ends at a NUL: all before it must decode, to the last character
                decoder.decode(block[:nul] if nul >= 0 else block, final=nul >= 0 or not block)
            except UnicodeDecodeError as exc:
                return start - pending + exc.start, f"byte 0x{exc.object[exc.start]:02x}"
            except UnicodeError as exc:  # one that names no byte: UTF-16 without its BOM
                return start - pending, str(exc)
            if nul >= 0:
                return start + nul, "NUL byte"
            if not block:
                return None
            start += len(block)


def require_text(key: str, paths: Iterable[str], encoding: str, allowed: str) -> str:
    """ConfigError on `key` for the first of `paths` that is not a regular file of text in
    `encoding`; else the files' content fingerprint (a sha256 of their sha256s, in order),
    at no cost beyond the check's own reading."""
    files = hashlib.sha256()
    for path in paths:
        digest = hashlib.sha256()
        try:
            bad = first_bad_byte(path, encoding, digest=digest)
        except NotRegular as exc:
            raise ConfigError(key, f"{exc}; allowed: {allowed}") from None
        files.update(f"{digest.hexdigest()}\n".encode())
        if bad is not None:
            offset, what = bad
            name = "UTF-8" if codecs.lookup(encoding).name == "utf-8" else encoding
            raise ConfigError(key, f"{path} is not {name} text ({what} at offset {offset}); "
                                   f"allowed: {allowed}")
    return files.hexdigest()


def fingerprint(paths: Iterable[str | os.PathLike], root: str | None = None) -> str:
    """The files' content fingerprint, as require_text gives it, for files it does not check
    (Parquet, a data=hf folder); with `root`, their paths under it are hashed too (a
    folder's layout says which file is which split)."""
    files = hashlib.sha256()
    for path in paths:
        digest = hashlib.sha256()
        with open_regular(path) as f:
            while block := f.read(BLOCK_SIZE):
                digest.update(block)
        name = "" if root is None else f" {os.path.relpath(path, root)}"
        files.update(f"{digest.hexdigest()}{name}\n".encode())
    return files.hexdigest()
