"""Small output helpers shared by the CLIs and the benchmarks: atomic files (JSON, checkpoints) and markdown tables."""

from __future__ import annotations

import json
import os
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
