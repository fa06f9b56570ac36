"""Upper bound: what the nearest PQFs, motion-compensated, could give the frames between them.

The frames between PQFs are 0.7 to 1.8 dB below the PQFs on the held-out clips
(docs/models.md, "Where the remaining error is"), and an oracle that picks,
per 8x8 block, between a frame and its average with the unaligned previous PQF
raises them by only 0.19 dB. Here the previous and next PQF are first warped
onto the frame with a SPyNet's flow (computed from the compressed frames, as a
network would), and the same oracle picks per block among the frame, each
warped PQF and their averages. Both the aligned and the unaligned bounds are
reported, with the PSNR of the warped PQFs themselves.

    python experiments/aligned_pqf_bound.py --flow runs/flow_spynet_pretrain_cpu/final.safetensors \
        --out experiments/results/aligned_pqf_bound.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pqf_neighbours import neighbour_pqfs

from vrestore import load
from vrestore.data.pairs import PairedClips, to_tensor
from vrestore.models.spynet import flow_warp


def block_mse(x: torch.Tensor, gt: torch.Tensor, block: int) -> torch.Tensor:
    """Per-block mean squared error (h/b, w/b) of (3, h, w) images in 0..255 (cropped to whole blocks)."""
    h, w = (x.shape[1] // block) * block, (x.shape[2] // block) * block
    e = ((x[:, :h, :w] - gt[:, :h, :w]) ** 2).mean(0, keepdim=True)
    return F.avg_pool2d(e, block)[0]


def psnr_of(mse: float) -> float:
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def candidates(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> list[torch.Tensor]:
    return [x, (x + a) / 2, (x + b) / 2, (x + a + b) / 3, a, b]


@torch.inference_mode()
def measure(spynet, lq: np.ndarray, gt: np.ndarray, pqfs: list[int], block: int, scale: int) -> dict:
    x = to_tensor(lq) * 255.0  # (T, 3, h, w)
    g = to_tensor(gt) * 255.0
    n = len(x)
    rows: dict[str, list[float]] = {k: [] for k in ("input", "warped_prev", "warped_next", "oracle_aligned",
                                                      "oracle_unaligned", "oracle_aligned_frame",
                                                      "prev", "next")}
    for t in range(n):
        if t in pqfs:
            continue
        ia, ib = neighbour_pqfs(t, pqfs, n)
        cur, pa, pb = x[t: t + 1], x[ia: ia + 1], x[ib: ib + 1]
        warped = []
        for p in (pa, pb):
            if scale > 1:
                small = [F.interpolate(v / 255.0, scale_factor=1 / scale, mode="area") for v in (cur, p)]
                flow = spynet(*small)
                flow = F.interpolate(flow, size=cur.shape[-2:], mode="bilinear", align_corners=False) * scale
            else:
                flow = spynet(cur / 255.0, p / 255.0)
            warped.append(flow_warp(p, flow, "border"))
        gt_t = g[t]
        for key, v in (("input", cur), ("warped_prev", warped[0]), ("warped_next", warped[1]), ("prev", pa),
                       ("next", pb)):
            rows[key].append(float(((v[0] - gt_t) ** 2).mean()))
        for key, (a, b) in (("oracle_unaligned", (pa, pb)), ("oracle_aligned", warped)):
            errs = torch.stack([block_mse(c[0], gt_t, block) for c in candidates(cur, a, b)])
            rows[key].append(float(errs.min(0).values.mean()))
        # the aligned oracle restricted to what a fusion must keep near the frame: frame or its averages
        rows["oracle_aligned_frame"].append(float(errs[:4].min(0).values.mean()))
    return {k: round(float(np.mean([psnr_of(m) for m in v])), 3) for k, v in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flow", required=True, help="a stage-1 file whose SPyNet computes the flow")
    ap.add_argument("--data", default="data/qe_test")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--scale", type=int, default=1, help="compute the flow at 1/scale size")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    spynet = load(args.flow).float().eval().spynet
    res = {}
    for name, lq, gt, pqfs in PairedClips(args.data, 2, 2).validation_clips(args.frames):
        res[name] = measure(spynet, lq, gt, pqfs, args.block, args.scale)
        print(name, res[name], flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "frames_between": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
