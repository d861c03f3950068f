"""Output folders and files of the command-line tools: checked before any work, never clobbered, owned by one run.

- :func:`check_writable_folder` and :func:`check_output_file` fail with one clear message
  naming the flag, before any work, when an output cannot be written or would overwrite a
  user's file.
- :class:`RunFolderLock` makes a run the only owner of its folder: an OS file lock
  (``fcntl.flock``) on ``<folder>/run.lock``, which the kernel releases when the process dies
  however it dies, so a crashed run never leaves the folder locked. The file holds the pid
  of its owner, for the message a second run gets.
- :func:`error_line` formats the one line a tool prints before exiting with status 2.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import ClassVar

__all__ = [
    "LOCK_FILE",
    "RunFolderBusyError",
    "RunFolderLock",
    "check_output_file",
    "check_writable_folder",
    "error_line",
]

LOCK_FILE = "run.lock"


def error_line(program: str, error: BaseException | str) -> str:
    """``program: error: <first line of the message>``: what a tool prints to stderr before exit status 2."""
    text = str(error).strip().splitlines()
    return f"{program}: error: {text[0] if text else type(error).__name__}"


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(folder: str | os.PathLike[str], flag: str) -> None:
    """Raise, naming ``flag``, unless ``folder`` is a folder we can write in, or one we can create.

    NotADirectoryError if it (or the nearest existing folder above it) is a file,
    PermissionError if that folder does not let us create a file (checked by creating and
    deleting one, which also catches read-only file systems). Creates nothing that stays.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{flag}: expected a folder, found a file: {folder}")
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag}: cannot create folder {folder}: {existing} is a file")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-test-"):
            pass
    except OSError as error:
        where = str(folder) if existing == folder.absolute() else f"{existing} (where {folder} would be created)"
        raise PermissionError(
            f"{flag}: expected a writable folder, found {where} not writable ({error.strerror or error})"
        ) from error


def check_output_file(path: str | os.PathLike[str], flag: str, overwrite: bool = False) -> None:
    """Raise, naming ``flag``, unless ``path`` can be written as a new file (or replaced, with ``overwrite``).

    IsADirectoryError if it is a folder, FileExistsError if it exists and ``overwrite`` is
    False, and the errors of :func:`check_writable_folder` for the folder it goes into.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag}: expected a file name, found a folder: {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{flag}: {path} already exists; pass --overwrite to replace it")
    check_writable_folder(path.parent, flag)


class RunFolderBusyError(RuntimeError):
    """Another live process holds the lock of a run folder."""


class RunFolderLock:
    """An exclusive, non-blocking OS lock on ``folder/run.lock``, held until :meth:`release` or process exit.

    ``acquire`` raises :class:`RunFolderBusyError` at once, naming the folder and the pid of
    the process that holds it, if another lock on the folder is held (in this or another
    process). The lock is a POSIX record lock (``fcntl.lockf``): it belongs to the process
    alone, so DataLoader workers forked from the run do not hold it, and the kernel drops it
    the moment its holder dies: after ``kill -9`` the folder can be resumed at once. On
    platforms without ``fcntl`` (Windows) it does nothing.
    """

    _held: ClassVar[set[Path]] = set()  # record locks do not exclude their own process: these do

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> RunFolderLock:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the folder is not guarded
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in RunFolderLock._held:  # checked before opening: closing any descriptor of the file would unlock it
            raise self._busy(str(os.getpid()))
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(descriptor, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(descriptor)
            raise self._busy(holder) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._descriptor = descriptor
        RunFolderLock._held.add(key)
        return self

    def _busy(self, holder: str) -> RunFolderBusyError:
        return RunFolderBusyError(
            f"--out {self.folder} is in use by another run (pid {holder}); wait for it to end, "
            "stop it, or choose another --out"
        )

    def release(self) -> None:
        if self._descriptor is not None:
            RunFolderLock._held.discard(self.path.resolve())
            os.close(self._descriptor)  # closing the descriptor drops the record lock
            self._descriptor = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
