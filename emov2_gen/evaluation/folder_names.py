"""Display names for runs or models given as folders: the folder names, numbered where two share one."""

from __future__ import annotations

from pathlib import Path


def folder_names(folders: list[str]) -> list[str]:
    """Each folder's own name; where two folders share a name, every one of them gets its position as a suffix."""
    names = [Path(folder).resolve().name for folder in folders]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]
