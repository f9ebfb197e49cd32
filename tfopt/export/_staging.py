"""Write a whole export beside its target, then switch it into place atomically.

One export into ``directory`` goes through these steps:

1. **Lock.** An exclusive ``fcntl.flock`` on the directory itself (no lock
   file to leave behind): two exports into one directory, from threads or
   processes, run one after the other. The second one then sees the first
   one's files, so with ``overwrite=False`` it fails instead of replacing
   them.
2. **Recover.** What an earlier export killed mid-way left is undone: a
   commit journal is rolled back (the previous export comes back whole),
   then every ``.tfopt-staging-*`` folder is removed.
3. **Stage.** Every artifact and the manifest are written into a hidden
   staging folder inside the directory (same file system: moves are renames).
4. **Commit.** A journal naming the staging folder, the targets to install
   and the stale artifacts of the previous export to remove is written
   (atomically, by rename); then each old artifact is moved into the
   staging folder and each new one into place; then the journal is deleted.
   Deleting the journal is the single switch: before it, any failure (an
   exception here, or a kill found by the next export) restores the old
   export exactly; after it, the new export is complete.
5. **Clean.** The staging folder (holding the old artifacts) is removed, and
   so is a directory this export created, if it fails.

``_fault_hook`` is for tests: it is called with the name of each step of the
commit (``"journal"``, ``"set_aside:<target>"``, ``"install:<target>"``,
``"remove:<target>"``, ``"switch"``, ``"clean"``) and may raise or kill the
process there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional

from tfopt.errors import ArtifactExistsError, ExportWriteError

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".tfopt-staging-"
JOURNAL = ".tfopt-journal.json"

_fault_hook: Optional[Callable[[str], None]] = None


def _step(name: str) -> None:
    if _fault_hook is not None:
        _fault_hook(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_error(exc: Exception, directory: Path) -> Optional[ExportWriteError]:
    """A TensorFlow write error that means a full or read-only disk, as an ExportWriteError."""
    message = str(exc)
    for text, code in (("No space left", errno.ENOSPC), ("Read-only file system", errno.EROFS),
                       ("Disk quota exceeded", errno.EDQUOT),
                       ("Permission denied", errno.EACCES)):
        if text in message:
            return write_error(OSError(code, text), directory)
    return None


def write_error(exc: OSError, directory: Path) -> ExportWriteError:
    """An OSError while writing an export, as a tfopt error that says what to do."""
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EEXIST: "a file is in the way"}.get(exc.errno, exc.strerror or str(exc))
    return ExportWriteError(
        f"Cannot write the export into {directory}: {reason} ({exc.filename or directory}). "
        "Existing files were left as they were. Free some space, fix the permissions, or "
        "pass another directory.")


class Staging:
    """Lock, staging folder and atomic commit for one export into ``directory``.

    Args:
        directory: The export directory (created if missing; removed again if
            the export fails and nothing else was in it).
        targets: Paths, relative to ``directory``, that this export writes.
        overwrite: Whether existing ``targets`` may be replaced.
        owned: Paths a previous export may have written (every format's
            target): those not among ``targets`` are removed at commit, so
            the directory holds exactly what the new manifest lists.
        keep: Paths that are installed like targets but never count as an
            existing export (a build cache).
    """

    def __init__(self, directory, targets: Iterable[str], overwrite: bool,
                 owned: Iterable[str] = (), keep: Iterable[str] = ()):
        self.directory = Path(directory)
        self.targets = list(targets)
        self.keep = list(keep)
        self.owned = [o for o in dict.fromkeys(owned) if o not in self.targets]
        self.overwrite = overwrite
        self.root = self.directory / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
        self._fd: Optional[int] = None
        self._created: list[Path] = []

    # -- checks ----------------------------------------------------------------

    def check_target(self) -> None:
        """Refuse a directory that is a file, or existing artifacts without overwrite."""
        probe = self.directory
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise ExportWriteError(
                f"Cannot export into {self.directory}: {probe} is a file, not a folder. "
                "Pass a directory path (it is created if missing).")
        if self.directory.is_dir():
            self._check_existing()

    def _check_existing(self) -> None:
        existing = [t for t in self.targets if t not in self.keep
                    and os.path.lexists(self.directory / t)]
        if existing and not self.overwrite:
            raise ArtifactExistsError(
                f"{self.directory} already holds {', '.join(existing)}. Pass overwrite=True "
                "to replace them (they are replaced only once the new export is "
                "complete and validated), or export to another directory.")
        in_the_way = [t for t in self.targets
                      if (self.directory / t).parent != self.directory
                      and any(p.exists() and not p.is_dir()
                              for p in _parents_within(self.directory, t))]
        if in_the_way:
            raise ExportWriteError(
                f"Cannot export into {self.directory}: a file is where a folder must go "
                f"for {', '.join(in_the_way)}. Remove it or export to another directory.")

    # -- lock, recover, stage --------------------------------------------------

    def __enter__(self) -> "Staging":
        self.check_target()
        try:
            self._lock()
            self._check_existing()  # again, now that no other export can write here
            self.root.mkdir()
        except OSError as exc:
            self._release(failed=True)
            raise write_error(exc, self.directory) from exc
        except BaseException:
            self._release(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release(failed=exc_type is not None)

    def _lock(self) -> None:
        while True:
            missing, probe = [], self.directory
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            for path in reversed(missing):
                try:
                    path.mkdir()
                    self._created.append(path)
                except FileExistsError:
                    pass
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    logger.warning("Another export into %s is running; waiting for it to "
                                   "finish.", self.directory)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                here = os.stat(self.directory)
            except FileNotFoundError:  # the export holding the lock removed the folder
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            mine = os.fstat(fd)
            if (here.st_dev, here.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            self._fd = fd
            break
        recover(self.directory)

    def _release(self, failed: bool) -> None:
        if self.root.exists():
            _remove(self.root)
        if failed:  # a directory this export created goes again, if nothing came in
            for path in reversed(self._created):  # deepest first
                try:
                    path.rmdir()
                except OSError:
                    break
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def path(self, target: str) -> Path:
        """Where to write ``target`` while staging."""
        path = self.root / "new" / target
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    # -- commit ----------------------------------------------------------------

    def commit(self) -> None:
        """Switch the staged export into place; on any failure restore the old one."""
        installs = [t for t in self.targets if os.path.lexists(self.root / "new" / t)]
        removals = [o for o in self.owned if os.path.lexists(self.directory / o)]
        journal = {"staging": self.root.name, "install": installs, "remove": removals}
        try:
            try:
                _step("journal")
                temporary = self.directory / (JOURNAL + ".tmp")
                with open(temporary, "w") as f:
                    json.dump(journal, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, self.directory / JOURNAL)
                _fsync_dir(self.directory)
                for target in installs:
                    final, old = self.directory / target, self.root / "old" / target
                    if os.path.lexists(final):
                        _step(f"set_aside:{target}")
                        old.parent.mkdir(parents=True, exist_ok=True)
                        os.replace(final, old)
                    _step(f"install:{target}")
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.root / "new" / target, final)
                for target in removals:
                    _step(f"remove:{target}")
                    old = self.root / "old" / target
                    old.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.directory / target, old)
                _fsync_dir(self.directory)
                _step("switch")
                os.unlink(self.directory / JOURNAL)  # the commit point
            except BaseException:
                _roll_back(self.directory, journal)
                (self.directory / (JOURNAL + ".tmp")).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise write_error(exc, self.directory) from exc
        self._created = []  # committed: the directory is the user's now
        _step("clean")
        _prune_empty_parents(self.directory, removals)


def _parents_within(directory: Path, target: str) -> list[Path]:
    parts = Path(target).parts[:-1]
    return [directory.joinpath(*parts[:i + 1]) for i in range(len(parts))]


def _prune_empty_parents(directory: Path, removed: list[str]) -> None:
    for target in removed:
        for parent in reversed(_parents_within(directory, target)):
            try:
                parent.rmdir()
            except OSError:
                break


def _roll_back(directory: Path, journal: dict) -> None:
    """Undo a commit from what is on disk: each step is detectable, so this is idempotent."""
    root = directory / journal["staging"]
    for target in journal["remove"]:
        old = root / "old" / target
        if os.path.lexists(old):
            (directory / target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(old, directory / target)
    for target in reversed(journal["install"]):
        final, old, new = directory / target, root / "old" / target, root / "new" / target
        installed = not os.path.lexists(new)
        if installed:
            _remove(final)
        if os.path.lexists(old):
            os.replace(old, final)
    _fsync_dir(directory)
    (directory / JOURNAL).unlink(missing_ok=True)


def recover(directory: Path) -> None:
    """Roll back a commit a killed export left, remove stale staging folders.

    Call with the directory's lock held.
    """
    directory = Path(directory)
    journal_path = directory / JOURNAL
    if journal_path.exists():
        try:
            journal = json.loads(journal_path.read_text())
            valid = (isinstance(journal, dict) and isinstance(journal.get("staging"), str)
                     and journal["staging"].startswith(STAGING_PREFIX)
                     and "/" not in journal["staging"])
        except ValueError:
            valid = False
        if valid:
            _roll_back(directory, journal)
        else:  # written half (the rename is atomic, so only by hand): nothing was moved
            journal_path.unlink()
    (directory / (JOURNAL + ".tmp")).unlink(missing_ok=True)
    for stale in directory.glob(STAGING_PREFIX + "*"):
        _remove(stale)
