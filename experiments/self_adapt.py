"""Probe: does stage 2 gain from adapting to the video it restores (no ground truth)?

The held-out clips differ from every training clip (Big Buck Bunny is rendered
animation), and more training data or steps no longer move them
(docs/models.md). A restorer can still learn from the video in hand: compress
its compressed frames once more with the same protocol, fine-tune stage 2 to
map the twice-compressed frames back to the compressed ones, then restore the
compressed frames with the adapted weights. No clean frame is used; the ground
truth only scores the result.

    python experiments/self_adapt.py --data data/qe_val data/qe_test --out experiments/results/self_adapt.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vrestore.data.pairs import augment, decoded_frames, read_meta, to_tensor
from vrestore.infer.device import keep_freed_memory
from vrestore.metrics import psnr
from vrestore.models.checkpoint import load
from vrestore.video.degrade import degrade_video


@torch.inference_mode()
def score(model: torch.nn.Module, lq: np.ndarray, gt: np.ndarray) -> float:
    """Mean RGB-PSNR of ``model`` on every frame (bf16 autocast, as the pipeline runs)."""
    model.eval()
    ps = []
    for t in range(len(lq)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(to_tensor(np.asarray(lq[t: t + 1])))[0].float()
        ps.append(psnr((y.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy(), gt[t]))
    model.train()
    return round(float(np.mean(ps)), 4)


def adapt_clip(name: str, root: Path, clip: dict, args: argparse.Namespace, tmp: Path) -> dict:
    lq, gt = decoded_frames(root, clip["lq"]), decoded_frames(root, clip["gt"])
    twice = tmp / f"{name}_q{args.qp}.mp4"
    degrade_video(root / clip["lq"], twice, qp=args.qp)
    lq2 = decoded_frames(tmp, twice.name)
    rec = {"input": round(float(np.mean([psnr(lq[t], gt[t]) for t in range(len(lq))])), 4),
           "twice_vs_once": round(float(np.mean([psnr(lq2[t], lq[t]) for t in range(len(lq))])), 4),
           "curve": []}
    torch.manual_seed(args.seed)
    model = load(args.init).float().train()
    rec["curve"].append({"steps": 0, "psnr": score(model, lq, gt)})
    print(name, rec, flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    rng = np.random.default_rng(args.seed)
    h, w = lq.shape[1:3]
    p = args.patch
    t0, done = time.time(), 0
    for stop in args.steps:
        for _ in range(stop - done):
            xs, ys = [], []
            for _ in range(args.batch):
                t = int(rng.integers(0, len(lq)))
                y0, x0 = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
                a, b = augment([lq2[t, y0: y0 + p, x0: x0 + p], lq[t, y0: y0 + p, x0: x0 + p]], rng)
                xs.append(a)
                ys.append(b)
            loss = F.mse_loss(model(to_tensor(np.stack(xs))), to_tensor(np.stack(ys)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        done = stop
        rec["curve"].append({"steps": stop, "psnr": score(model, lq, gt), "train_s": round(time.time() - t0, 1)})
        print(name, rec["curve"][-1], flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["data/qe_val", "data/qe_test"])
    ap.add_argument("--init", default="src/vrestore/weights/qe_fast_stage2.safetensors")
    ap.add_argument("--qp", type=int, default=37, help="QP of the second compression")
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    keep_freed_memory()
    res = {}
    with tempfile.TemporaryDirectory() as d:
        for r in args.data:
            root = Path(r)
            for name, clip in sorted(read_meta(root)["clips"].items()):
                res[name] = adapt_clip(name, root, clip, args, Path(d))
    Path(args.out).write_text(json.dumps({"args": vars(args), "clips": res}, indent=1) + "\n")


if __name__ == "__main__":
    main()
