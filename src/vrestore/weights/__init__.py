"""Bundled default models, registered by name (``vrestore models`` lists them).

``models.json`` maps a name to its stage-1 and optional stage-2 files in this
folder; ``bundled_path("qe")`` is the stage-1 file, ``bundled_path("qe:stage2")``
the stage-2 file.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def bundled_models() -> dict[str, dict]:
    f = HERE / "models.json"
    return json.loads(f.read_text()) if f.exists() else {}


def bundled_path(name: str) -> Path | None:
    base, _, part = name.partition(":")
    entry = bundled_models().get(base)
    if entry is None:
        return None
    fname = entry.get(part or "stage1")
    if not fname:
        return None
    p = HERE / fname
    return p if p.exists() else None
