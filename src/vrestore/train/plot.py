"""Training curves from a run's ``metrics.jsonl``: loss (raw and smoothed) and
validation PSNR against iterations, recipe steps marked, written as a PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import VrestoreError


def read_log(path: str | os.PathLike) -> list[dict]:
    """Records of a run folder or a ``metrics.jsonl`` file; unreadable lines
    (a run killed mid-write) are skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise VrestoreError(f"{path}: no such training log (expected a run folder or its metrics.jsonl)")
    recs = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and isinstance(r.get("iter"), int):
            recs.append(r)
    if not recs:
        raise VrestoreError(f"{path}: holds no training records")
    # A resumed run repeats the iterations after its last checkpoint: the later record wins.
    by_iter: dict[int, dict] = {}
    for r in recs:
        by_iter[r["iter"]] = {**by_iter.get(r["iter"], {}), **r}
    return [by_iter[i] for i in sorted(by_iter)]


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_log(path: str | os.PathLike, out: str | os.PathLike, smooth: int = 25) -> dict:
    """Draw the curves of ``path`` into ``out`` (PNG); returns a summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(path)
    loss = [(r["iter"], r["loss"]) for r in recs if isinstance(r.get("loss"), (int, float))]
    val = [(r["iter"], r["val_psnr"]) for r in recs if isinstance(r.get("val_psnr"), (int, float))]
    starts: list[tuple[int, str]] = []
    for r in recs:
        if "step" in r and (not starts or starts[-1][1] != r["step"]):
            starts.append((r["iter"], r["step"]))
    clips = _clip_curves(recs)
    rows = 1 + bool(val) + bool(clips)
    fig, axes = plt.subplots(rows, 1, figsize=(9, 3.8 + 2.7 * (rows - 1)), sharex=True, squeeze=False)
    ax = axes[0][0]
    if loss:
        it, lv = zip(*loss, strict=True)
        ax.plot(it, lv, color="0.75", lw=0.6, label="loss")
        # Smooth within each recipe step: steps may change the loss function.
        step_of = {r["iter"]: r.get("step") for r in recs}
        seg: list[tuple[int, float]] = []
        for k, (i, v) in enumerate(loss):
            seg.append((i, v))
            if k + 1 == len(loss) or step_of.get(loss[k + 1][0]) != step_of.get(i):
                xs, ys = zip(*seg, strict=True)
                ax.plot(xs, _smooth(list(ys), smooth), color="C0", lw=1.5,
                        label=f"mean of {smooth}" if xs[0] == it[0] else None)
                seg = []
        if min(lv) > 0:
            ax.set_yscale("log")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right", fontsize=8)
    if val:
        axv = axes[1][0]
        vi, vv = zip(*val, strict=True)
        axv.plot(vi, vv, "o-", color="C1", ms=3)
        axv.set_ylabel("validation RGB-PSNR (dB)")
    if clips:
        axc = axes[-1][0]
        for k, (name, pts) in enumerate(clips.items()):
            ci, cv = zip(*pts, strict=True)
            axc.plot(ci, [v - cv[0] for v in cv], "o-", color=f"C{(k + 2) % 10}", ms=2.5, lw=1, label=name)
        axc.axhline(0, color="0.3", lw=0.6)
        axc.set_ylabel("per clip, change (dB)")
        axc.legend(loc="best", fontsize=7)
    for a in (row[0] for row in axes):
        for x, _ in starts:
            a.axvline(x, color="0.5", ls=":", lw=0.8)
        a.grid(alpha=0.3)
    for x, name in starts:
        ax.annotate(name, (x, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top",
                    ha="right", color="0.35")
    axes[-1][0].set_xlabel("iteration")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    summary = {"records": len(recs), "last_iter": recs[-1]["iter"], "steps": [n for _, n in starts]}
    if loss:
        summary["loss_first_last"] = [loss[0][1], loss[-1][1]]
    if val:
        best = max(val, key=lambda v: v[1])
        summary["val_psnr_first_last_best"] = [val[0][1], val[-1][1], best[1]]
        summary["best_iter"] = best[0]
    if clips:
        summary["val_clips_first_last"] = {n: [pts[0][1], pts[-1][1]] for n, pts in clips.items()}
    return summary


def _clip_curves(recs: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(iteration, PSNR) per validation clip, from the ``val_psnr_clips`` that
    runs since 2026-11-24 log (older logs have none)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in recs:
        if isinstance(r.get("val_psnr_clips"), dict):
            for name, v in r["val_psnr_clips"].items():
                if isinstance(v, (int, float)):
                    out.setdefault(name, []).append((r["iter"], float(v)))
    return out
