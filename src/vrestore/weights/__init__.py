"""Bundled default models, registered by name (``vrestore models`` lists them).

``models.json`` maps a name to its stage-1 file and optional stage 2 in this
folder: one file, or a list of files whose outputs are averaged (a stage-2
ensemble). ``bundled_path("qe")`` is the stage-1 file, ``bundled_path("qe:stage2")``
the stage-2 file, ``bundled_paths("qe-hq:stage2")`` every stage-2 file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import VrestoreError

HERE = Path(__file__).parent


def bundled_models() -> dict[str, dict]:
    f = HERE / "models.json"
    return json.loads(f.read_text()) if f.exists() else {}


def bundled_paths(name: str) -> list[Path]:
    """The files of ``name`` (``"qe"``: stage 1, ``"qe:stage2"``: its stage 2s), or [] if there are none
    (an unknown name, a model without that part, or a file missing from the install)."""
    base, _, part = name.partition(":")
    entry = bundled_models().get(base)
    if entry is None or part not in ("", "stage1", "stage2"):
        return []
    fnames = entry.get(part or "stage1") or []
    paths = [HERE / f for f in ([fnames] if isinstance(fnames, str) else fnames)]
    return paths if paths and all(p.exists() for p in paths) else []


def bundled_path(name: str) -> Path | None:
    """The one file of ``name``, or None; a stage-2 ensemble has several, so naming it here is an error that
    lists them (``bundled_paths`` returns them all)."""
    paths = bundled_paths(name)
    if len(paths) > 1:
        names = ", ".join(p.name for p in paths)
        raise VrestoreError(f"{name} is an ensemble of {len(paths)} stage-2 files ({names}): name one by its path")
    return paths[0] if paths else None


def unresolved(name: str) -> VrestoreError:
    """The error for a name that ``bundled_path`` does not resolve; it says so when ``name`` is a bundled
    model that lacks the part asked for (a stage-2-only model has no stage-1 file)."""
    base, _, part = name.partition(":")
    entry = bundled_models().get(base)
    if entry is not None and part in ("", "stage1", "stage2") and not entry.get(part or "stage1"):
        lacks, has = ("stage 2", "stage1") if part == "stage2" else ("stage 1", "stage2")
        return VrestoreError(f"{name}: the bundled model {base} has no {lacks}; its files: {base}:{has}")
    return VrestoreError(f"{name}: no such checkpoint file or bundled model name")
