"""Output that never harms input: written under a temporary sibling and renamed into place, never over or inside an
input, and one writer at a time."""

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from recsys_mtl.errors import InputError, OutputExistsError

LOCK_FILE = ".lock"


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `out` only if the block finishes without an exception.

    A failure (or a kill) leaves `out` as it was, and the temporary folder is removed on failure.

    Raises:
        OutputExistsError: `out` exists and `overwrite` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces `path` in one rename if the block finishes, and is
    removed if it fails. A kill leaves a `.NAME.tmp-PID` file behind, never a partial `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def check_output(out: Path, *inputs: Path) -> None:
    """Refuse an output folder that is, contains or lies inside one of `inputs` (writing it could destroy them).

    Raises:
        InputError: naming both paths.
    """
    target = Path(out).resolve()
    for inp in inputs:
        source = Path(inp).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise InputError(f"--out {out} is, contains or lies inside the input {inp}; choose a folder outside it")


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold `folder` for one writer while the block runs (an exclusive flock on `folder/.lock`, created if needed).

    The kernel releases the lock when its holder exits or is killed, so a killed writer's lock is taken over at once.

    Raises:
        OutputExistsError: another live process holds `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise OutputExistsError(
                f"{folder} is in use by another process ({handle.read().strip() or 'unknown'}); "
                "wait for it to finish or choose another folder"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
