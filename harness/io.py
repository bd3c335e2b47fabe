"""Atomic file writers: a reader (or a crash) never sees a half-written file.

Each writes to `<name>.<pid>.tmp` in the same folder and renames it over the target
(os.replace is atomic on POSIX file systems), so concurrent writers never share a
temporary file either.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_torch_save"]


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, then move the file into place."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | Path, obj: Any, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    return atomic_write(path, lambda p: torch.save(obj, p))
