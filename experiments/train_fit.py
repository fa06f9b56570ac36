"""How well a stage-1 model fits the clips it trained on.

    python experiments/train_fit.py data/qe_train8 runs/RUN/final.safetensors [--clips 8] [--out JSON]

Two measures, both on training data (an upper bound, not a held-out gain):
whole clips (the first 30 frames of ``--clips`` clips spread evenly over the
set, restored as `vrestore restore` would, RGB-PSNR of input and output and
the mean colour the model adds, in grey levels) and training windows (12
batches of 4 windows of 5 frames, drawn as the trainer draws them, 128 px,
the model's MSE against the identity's). A model that trains well beats the
identity on both; one that does not shows where it goes wrong.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vrestore import metrics
from vrestore.data.pairs import PairedClips
from vrestore.infer.restorer import Restorer
from vrestore.models import load


def whole_clips(root: Path, model: Path, n: int, frames: int = 30) -> list[dict]:
    clips = PairedClips(root, 2, 2)
    r = Restorer(model, None)
    rows = []
    for k in np.linspace(0, len(clips.clips) - 1, n).astype(int):
        c = clips.clips[k]
        m = min(frames, len(c.lq))
        lq, gt = np.array(c.lq[:m]), np.array(c.gt[:m])
        out = r.restore_frames(lq, sorted(p for p in c.pqfs if p < m))
        p_in, p_out = (metrics.score_video(gt, x, c.name, with_ssim=False).summary()["psnr_rgb"] for x in (lq, out))
        added = (out.astype(np.float64) - lq).mean((0, 1, 2))
        true = (gt.astype(np.float64) - lq).mean((0, 1, 2))
        rows.append({"clip": c.name, "frames": m, "input": p_in, "output": p_out, "gain": p_out - p_in,
                     "mean_added_rgb": added.round(2).tolist(), "mean_true_rgb": true.round(2).tolist()})
        print(f"{c.name:34s} input {p_in:.3f}  output {p_out:.3f}  gain {p_out - p_in:+.3f}  "
              f"adds {added.round(2)} (true {true.round(2)})", flush=True)
    return rows


@torch.no_grad()
def windows(root: Path, model: Path, batches: int = 12, batch: int = 4, clip_len: int = 5,
            patch: int = 128) -> dict:
    ds = PairedClips(root, clip_len, patch)
    m = load(model).eval()
    rng = np.random.default_rng(0)
    ident, mod = [], []
    for _ in range(batches):
        lq, gt, pqfs = ds.sample(batch, rng)
        base = lq if ds.scale == 1 else torch.nn.functional.interpolate(
            lq.flatten(0, 1), scale_factor=ds.scale, mode="bicubic").clamp(0, 1).unflatten(0, lq.shape[:2])
        ident.append(float(((base - gt) ** 2).mean()))
        mod.append(float(((m(lq, pqfs=pqfs).clamp(0, 1) - gt) ** 2).mean()))
    a, b = float(np.mean(ident)), float(np.mean(mod))
    res = {"windows": batches * batch, "clip_len": clip_len, "patch": patch, "identity_mse": a, "model_mse": b,
           "gain_db": 10 * np.log10(a / b)}
    print(f"training windows: identity {-10 * np.log10(a):.3f} dB, model {-10 * np.log10(b):.3f} dB, "
          f"gain {res['gain_db']:+.3f}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    rows = whole_clips(a.data, a.model, a.clips)
    res = {"data": str(a.data), "model": str(a.model), "clips": rows,
           "mean_clip_gain": float(np.mean([r["gain"] for r in rows])), "windows": windows(a.data, a.model)}
    print(f"mean gain over the clips: {res['mean_clip_gain']:+.3f} dB")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
