"""How well a BasicVSR++'s SPyNet aligns the held-out clips.

    python experiments/flow_quality.py qe [MODEL ...]     # or x4; bundled model by default

For each model, flows are computed as the network computes them (from the
compressed frames; the same-size model at 1/4 size, bicubic), then the clean
frame t+1, at the flow's size (area downscaling), is warped onto clean frame t
and scored (PSNR over the pixels whose flow stays inside the frame, both
directions, mean over frames). ``zero flow`` is the same score without
warping: how far the frames are apart. Writes
``experiments/results/flow_quality_<task>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from vrestore import load
from vrestore.data.pairs import PairedClips, to_tensor
from vrestore.models.spynet import flow_warp
from vrestore.weights import bundled_path

ROOT = Path(__file__).resolve().parents[1]


def _inside(flow: torch.Tensor) -> torch.Tensor:
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x, y = xs + flow[:, 0], ys + flow[:, 1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def warp_psnr(ref: torch.Tensor, supp: torch.Tensor, flow: torch.Tensor | None) -> float:
    """Mean PSNR of ``supp`` warped onto ``ref`` (N, 3, h, w) in [0, 1]."""
    if flow is None:
        warped, inside = supp, torch.ones(ref.shape[0], *ref.shape[2:], dtype=torch.bool)
    else:
        warped, inside = flow_warp(supp, flow), _inside(flow)
    err = ((warped - ref) ** 2).mean(1)
    mse = torch.stack([e[m].mean() for e, m in zip(err, inside, strict=True)])
    return float((-10 * torch.log10(mse.clamp_min(1e-10))).mean())


DIRECTIONS = ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1)))  # (ref, supp) frames


def measure(model, lq: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """lq (T, 3, h, w), gt (T, 3, H, W): warp PSNR with the model's flow and with none."""
    flow_in = model.flow_frames(lq.unsqueeze(0))[0]
    clean = F.interpolate(gt, size=flow_in.shape[-2:], mode="area")
    out = {"zero_flow": 0.0, "model": 0.0}
    for a, b in DIRECTIONS:
        out["model"] += warp_psnr(clean[a], clean[b], model.spynet(flow_in[a], flow_in[b])) / 2
        out["zero_flow"] += warp_psnr(clean[a], clean[b], None) / 2
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("task", choices=("qe", "x4"))
    ap.add_argument("models", nargs="*", help="model files (default: the bundled stage 1)")
    ap.add_argument("--data", default=None, help="prepared held-out set (default data/<task>_test)")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    models = args.models or [str(bundled_path(args.task))]
    clips = PairedClips(args.data or ROOT / "data" / f"{args.task}_test", 2, 2).validation_clips(args.frames)
    result: dict[str, dict] = {}
    for path in models:
        model = load(path).float().eval()
        rows = {}
        for name, lq, gt, _ in clips:
            rows[name] = {k: round(v, 3) for k, v in measure(model, to_tensor(lq), to_tensor(gt)).items()}
        result[path] = rows
        print(path, json.dumps(rows))
    out = Path(args.out or ROOT / "experiments" / "results" / f"flow_quality_{args.task}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
