"""Checkpoints that survive the cluster: written atomically (`AtomicCheckpointIO`, the default Trainer plugin), checked
before a resume without loading weights (`checkpoint_problem`), `ckpt_path=last` as the newest intact one."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_ralora.core.io import atomic_write, recover_replaced
from lightning_ralora.modules.adapter_module import checkpoint_metadata_file
from lightning_ralora.run.record import ATTEMPTS

CHECKPOINTS = "checkpoints"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on every filesystem: the checkpoint goes to a temporary file in its own
    directory and is renamed over the old one once flushed and fsynced (`io.atomic_write`), so the previous good
    checkpoint stays until the new one is complete and a full disk never leaves a partial file under a valid name.
    (Lightning's own writer stages the file in $TMPDIR, and the move becomes a copy in place across filesystems.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes `path` unusable as a Lightning checkpoint (missing, empty, truncated, not a torch archive), or None.
    Checks the zip archive's directory and every member's extent against the file size (what truncation breaks)
    and the CRC of its pickled index; a sharded (FSDP2) directory needs its metadata files."""
    path = Path(path)
    if not path.exists():
        return "not found"
    if path.is_dir():
        from lightning.fabric.utilities.load import _METADATA_FILENAME

        missing = [n for n in (_METADATA_FILENAME, ".metadata") if not (path / n).is_file()]
        if missing:
            return f"is a directory without {' and '.join(missing)} (not a complete sharded checkpoint)"
        return checkpoint_problem(path / _METADATA_FILENAME)
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            for info in members:
                if info.header_offset + info.compress_size > size:
                    return f"is truncated ({size} bytes; member {info.filename} ends past the end)"
            index = next((i for i in members if i.filename.endswith("data.pkl")), None)
            if index is None:
                return "is a zip archive without data.pkl (not a torch checkpoint)"
            archive.read(index)  # CRC-checked
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"is not a complete torch checkpoint ({size} bytes: {err})"
    return None


def checkpoint_step(path: str | Path) -> int | None:
    """The `global_step` a checkpoint was saved at (None when it cannot be read)."""
    try:
        ckpt = torch.load(checkpoint_metadata_file(path), map_location="cpu", weights_only=False, mmap=True)
        return int(ckpt.get("global_step")) if isinstance(ckpt, Mapping) else None
    except Exception:  # noqa: BLE001 - only for messages
        return None


def newest_intact_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint under <run_dir>/checkpoints that passes `checkpoint_problem` (last.ckpt first among
    equals), and one line per newer one that was skipped."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None, []
    candidates = [p for p in folder.iterdir() if p.name.endswith(".ckpt") and not p.name.startswith(".")]
    candidates.sort(key=lambda p: (p.stat().st_mtime, p.name == "last.ckpt"), reverse=True)
    skipped = []
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path} {problem}")
    return None, skipped


def remove_stale_temporaries(run_dir: str | Path) -> list[str]:
    """Clear what an interrupted write left, before a checkpoint is chosen (only the lock holder calls this): the
    temporary files of atomic writes, and a killed sharded save's staged or set-aside directories
    (`io.recover_replaced`). Returns one line per checkpoint restored or removed."""
    for folder in (Path(run_dir), Path(run_dir) / CHECKPOINTS, Path(run_dir) / ATTEMPTS):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
    checkpoints = Path(run_dir) / CHECKPOINTS
    return recover_replaced(checkpoints) if checkpoints.is_dir() else []
