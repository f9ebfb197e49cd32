"""Write artifacts beside their targets, move them into place only when all are good.

Every artifact of one export is built in a hidden staging folder inside the
export directory (same file system, so moves are renames). Only after all of
them are written and validated are they moved into place; a previous
artifact at a target is set aside first and restored if a move fails. An
error or interruption before that leaves every existing file as it was.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from tfopt.errors import ArtifactExistsError


class Staging:
    """Staging area for the artifacts of one export into ``directory``."""

    def __init__(self, directory: Path, targets: list[str], overwrite: bool):
        self.directory = Path(directory)
        self.targets = list(targets)
        existing = [t for t in self.targets if (self.directory / t).exists()]
        if existing and not overwrite:
            raise ArtifactExistsError(
                f"{self.directory} already holds {', '.join(existing)}. Pass overwrite=True "
                "to replace them (they are replaced only once the new export is "
                "complete and validated), or export to another directory."
            )
        self.root = self.directory / f".tfopt-staging-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "Staging":
        self.root.mkdir(parents=True)
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def path(self, target: str) -> Path:
        """Where to write ``target`` while staging."""
        path = self.root / "new" / target
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self) -> None:
        """Move every staged artifact into place, restoring the old ones on failure."""
        backups: list[tuple[Path, Path]] = []
        moved: list[Path] = []
        try:
            for target in self.targets:
                staged, final = self.root / "new" / target, self.directory / target
                if not staged.exists():
                    continue
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():
                    backup = self.root / "old" / target
                    backup.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(final, backup)
                    backups.append((backup, final))
                os.replace(staged, final)
                moved.append(final)
        except BaseException:
            for final in moved:
                if final.is_dir():
                    shutil.rmtree(final, ignore_errors=True)
                else:
                    final.unlink(missing_ok=True)
            for backup, final in backups:
                os.replace(backup, final)
            raise
