"""Does a training set teach anything that carries over to unseen clips?

    python experiments/plain_cnn_probe.py data/qe_train [--steps 3000] [--loss mse]

Trains a plain 6-layer, 32-channel residual CNN (single frame, full
resolution, bf16 autocast; about 2 minutes here) on 64 px patches of a
prepared QE set, then reports the RGB-PSNR change over the compressed input on
the first frames of training, validation and held-out clips, with the mean
colour of its correction on each. A data set that makes even this model lose
on the held-out clips (or shift their colours) will not train BasicVSR++
either; docs/models.md uses it to compare training sets. Writes
experiments/results/plain_cnn_probe_<set>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vrestore import metrics
from vrestore.data.pairs import PairedClips, to_tensor
from vrestore.train.engine import LOSSES
from vrestore.video.io import VideoReader

ROOT = Path(__file__).resolve().parents[1]


class PlainCNN(nn.Module):
    """conv-LeakyReLU stack with a global residual; the last conv starts at zero (the identity)."""

    def __init__(self, width: int = 32, depth: int = 6):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1), nn.LeakyReLU(0.1)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, 1, 1), nn.LeakyReLU(0.1)]
        layers.append(nn.Conv2d(width, 3, 3, 1, 1))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def train(train_set: Path, steps: int, seed: int = 0, loss_name: str = "charbonnier") -> PlainCNN:
    torch.manual_seed(seed)
    net = PlainCNN()
    data = PairedClips(train_set, clip_len=1, patch=64)
    opt = torch.optim.Adam(net.parameters(), 1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        lq, gt, _ = data.sample(16, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(lq[:, 0])
        loss = LOSSES[loss_name](out.float(), gt[:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def evaluate(net: PlainCNN, root: Path, frames: int, clips: int) -> list[dict]:
    meta = json.loads((root / "meta.json").read_text())
    rows = []
    for name, c in sorted(meta["clips"].items())[:clips]:
        gt = np.stack([f.rgb for f in VideoReader(root / c["gt"], max_frames=frames)])
        lq = np.stack([f.rgb for f in VideoReader(root / c["lq"], max_frames=frames)])
        x = to_tensor(lq)
        with torch.no_grad():
            y = torch.cat([net(x[i:i + 4]) for i in range(0, len(x), 4)])
        pred = (y.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        before = metrics.score_video(gt, lq, name).summary()["psnr_rgb"]
        after = metrics.score_video(gt, pred, name).summary()["psnr_rgb"]
        shift = (pred.astype(np.float64) - lq).mean((0, 1, 2))
        rows.append({"set": root.name, "clip": name, "input_psnr": before, "output_psnr": after,
                     "gain": after - before, "mean_correction_rgb": [round(float(v), 2) for v in shift]})
        print(f"{root.name:10s} {name:28s} {before:.3f} -> {after:.3f} ({after - before:+.3f} dB), "
              f"mean correction RGB {rows[-1]['mean_correction_rgb']}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train_set", type=Path)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--loss", choices=("charbonnier", "mse"), default="charbonnier")
    a = ap.parse_args()
    net = train(a.train_set, a.steps, loss_name=a.loss)
    rows = evaluate(net, a.train_set, 10, 4)
    rows += evaluate(net, ROOT / "data" / "qe_val", 20, 2)
    rows += evaluate(net, ROOT / "data" / "qe_test", 20, 2)
    held = [r["gain"] for r in rows if r["set"] == "qe_test"]
    print(f"held-out mean gain {np.mean(held):+.3f} dB")
    suffix = "" if a.loss == "charbonnier" else f"_{a.loss}"
    out = ROOT / "experiments" / "results" / f"plain_cnn_probe_{a.train_set.name}{suffix}.json"
    out.write_text(json.dumps({"train_set": str(a.train_set), "steps": a.steps, "loss": a.loss, "rows": rows,
                               "held_out_mean_gain": float(np.mean(held))}, indent=1))


if __name__ == "__main__":
    main()
