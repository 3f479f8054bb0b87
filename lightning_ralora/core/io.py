"""Small output helpers shared by the CLIs and the benchmarks: atomic files (JSON, checkpoints, sharded checkpoint
directories) and markdown tables."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any


def _file_mode() -> int:
    """The mode a plainly created file gets under this process's umask (mkstemp's own 0600 would hide records and
    checkpoints from the rest of a group sharing a project directory)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened, e.g. some network mounts)."""
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


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that `path` is either its old content or the complete new one, on any filesystem: `write`
    fills a temporary file in `path`'s own directory (a rename there never becomes a copy), which is flushed,
    fsynced and renamed over `path`; on any error (a full disk included) the temporary file is removed and `path`
    is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def remove_path(path: str | Path) -> None:
    """Remove a file, a link or a directory tree at `path`, if anything is there."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def staging_path(path: str | Path) -> Path:
    """Where a checkpoint directory bound for `path` is written first (a hidden sibling, so a rename never copies,
    and checkpoint listings skip it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def _aside_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def replace_with_staged(path: str | Path, staged: str | Path) -> Path:
    """Put the complete `staged` file or directory (a sharded checkpoint) under `path`'s name, so `path` is always
    either the old complete one or the new complete one: `staged` is fsynced, the old `path` renamed aside, `staged`
    renamed in, the old one removed. (Directories cannot be renamed over one another; killed between the two renames,
    both complete copies exist, the old one as `.<name>.old`: `recover_replaced` puts it back.)"""
    path, staged = Path(path), Path(staged)
    for f in [staged] if staged.is_file() else sorted(p for p in staged.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    old = _aside_path(path)
    remove_path(old)
    if path.exists() or path.is_symlink():
        os.rename(path, old)
    os.rename(staged, path)
    fsync_dir(path.parent)
    remove_path(old)
    return path


def save_staged(path: str | Path, save: Callable[[Path], None], barrier: Callable[[str], None], writer: bool) -> Path:
    """Save a checkpoint every rank takes part in without ever leaving a partial one under `path`: the `writer` rank
    removes a staged copy a killed save left, every rank writes its part to `staging_path(path)` (`save`), then the
    writer renames it in (`replace_with_staged`); `barrier` keeps the ranks in step between the phases."""
    path = Path(path)
    staged = staging_path(path)
    if writer:
        remove_path(staged)
    barrier("checkpoint_staging")
    save(staged)
    barrier("checkpoint_written")
    if writer:
        replace_with_staged(path, staged)
    barrier("checkpoint_renamed")
    return path


def recover_replaced(folder: str | Path) -> list[str]:
    """Undo what a killed `replace_with_staged` left in `folder`: staged copies (never renamed in, so incomplete or
    unconfirmed) are deleted; an old copy renamed aside comes back under its name when nothing replaced it, else it is
    deleted. Returns one line per change."""
    folder, notes = Path(folder), []
    for staged in sorted(folder.glob(".*.partial")):
        remove_path(staged)
        notes.append(f"removed {staged} (a save that did not finish)")
    for old in sorted(folder.glob(".*.old")):
        name = folder / old.name[1 : -len(".old")]
        if name.exists() or name.is_symlink():
            remove_path(old)
        else:
            os.rename(old, name)
            notes.append(f"restored {name} (its replacement was not renamed in)")
    return notes


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON atomically (`atomic_write`): readers never see a half-written file. Values JSON
    cannot hold are written with str()."""
    text = json.dumps(data, indent=2, default=str) + "\n"  # serialised first: a bad value fails before any file
    return atomic_write(path, lambda f: f.write(text.encode()))


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (no trailing newline): a header row, a separator, then one line per row."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
