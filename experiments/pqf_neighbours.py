"""Probe: does stage 2 gain from seeing the neighbouring peak-quality frames?

The frames between PQFs are 0.7 to 1.8 dB below the PQFs on the held-out
clips, and a single-frame stage 2 keeps that gap (docs/models.md, "Where the
remaining error is"). Here the bundled `qe-fast` stage 2 is given, beside the
frame, the nearest PQF before and after it (unaligned, as differences from the
frame) through one extra 3x3 convolution added to its first features. That
convolution starts at zero, so the model starts as the bundled one. Two arms
train from the same file, seed, batches and steps on the compressed frames of
the prepared training sets: the single-frame stage 2 (the control) and the one
with neighbours. Both are scored on the validation clips (``data/qe_val``);
``--heldout`` scores the saved arms on the held-out clips afterwards.

    python experiments/pqf_neighbours.py --iters 1500 --every 250 --save runs/pqf_probe \
        --out experiments/results/pqf_neighbours.json
    python experiments/pqf_neighbours.py --heldout data/qe_test --save runs/pqf_probe \
        --out experiments/results/pqf_neighbours_heldout.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vrestore.data.pairs import PairedClips, augment, to_tensor
from vrestore.infer.device import keep_freed_memory
from vrestore.metrics import psnr
from vrestore.models.checkpoint import load, save


def neighbour_pqfs(t: int, pqfs: list[int], n: int) -> tuple[int, int]:
    """Nearest PQF strictly before and strictly after frame ``t`` (the frame
    itself where there is none, which makes its difference zero)."""
    before = [p for p in pqfs if p < t]
    after = [p for p in pqfs if t < p < n]
    return (before[-1] if before else t), (after[0] if after else t)


class WithNeighbours(nn.Module):
    """A restoration SwinIR whose first features also see (previous PQF -
    frame, next PQF - frame); zero-initialised, so it starts as ``base``."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        d = base.cfg.embed_dim
        self.side = nn.Conv2d(6, d, 3, 1, 1)
        nn.init.zeros_(self.side.weight)
        nn.init.zeros_(self.side.bias)

    def forward(self, x: torch.Tensor, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        b = self.base
        h, w = x.shape[-2:]
        ws = b.cfg.window_size
        ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
        stack = torch.cat([x, prev - x, nxt - x], 1)
        if ph or pw:
            stack = F.pad(stack, (0, pw, 0, ph), mode="reflect")
        xc = stack[:, :3]
        mean = b.mean.to(x.dtype)
        xn = (xc - mean) * b.cfg.img_range
        first = b.conv_first(xn) + self.side(stack[:, 3:] * b.cfg.img_range)
        res = b.conv_after_body(b.forward_features(first)) + first
        y = xn + b.conv_last(res)
        return (y / b.cfg.img_range + mean)[..., :h, :w]


class Plain(nn.Module):
    """The control arm: the same call, neighbours ignored."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        return self.base(x)


def make_arm(arm: str, init: str) -> nn.Module:
    """The ``plain`` or ``neighbours`` arm around a fresh copy of ``init``."""
    base = load(init)
    return WithNeighbours(base) if arm == "neighbours" else Plain(base)


class Triples:
    """(frame, previous PQF, next PQF, truth) patches from prepared data sets
    (``vrestore prepare``; the compressed frames, as a stage 2 run alone sees
    them), clips in name order, each data set after the one before."""

    def __init__(self, roots: list[str], patch: int):
        clips = [c for r in roots for c in PairedClips(r, 2, 2).clips]
        self.inp, self.gt = [c.lq for c in clips], [c.gt for c in clips]
        self.pqfs = [sorted(c.pqfs) for c in clips]
        self.index = [(k, t) for k, clip in enumerate(self.inp) for t in range(len(clip))]
        self.patch = patch

    def sample(self, batch: int, rng: np.random.Generator) -> list[torch.Tensor]:
        p = self.patch
        out: list[list[np.ndarray]] = [[], [], [], []]
        for _ in range(batch):
            k, t = self.index[int(rng.integers(0, len(self.index)))]
            a, b = neighbour_pqfs(t, self.pqfs[k], len(self.inp[k]))
            h, w = self.inp[k].shape[1:3]
            y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            sl = np.s_[y: y + p, x: x + p]
            crops = augment([self.inp[k][t][sl], self.inp[k][a][sl], self.inp[k][b][sl], self.gt[k][t][sl]], rng)
            for o, c in zip(out, crops, strict=True):
                o.append(c)
        return [to_tensor(np.stack(o)) for o in out]


@torch.inference_mode()
def validate(model: nn.Module, clips: list, frames: int, split: bool = False) -> dict:
    """Mean RGB-PSNR per clip over its first ``frames`` frames; ``split``: also
    over its PQFs and over the frames between them."""
    model.eval()
    scores: dict = {}
    for name, lq, gt, pqfs in clips:
        x = to_tensor(np.asarray(lq[:frames]))
        ps = []
        for t in range(len(x)):
            a, b = neighbour_pqfs(t, pqfs, len(x))
            y = model(x[t: t + 1], x[a: a + 1], x[b: b + 1])[0]
            out = (y.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            ps.append(psnr(out, gt[t]))
        scores[name] = round(float(np.mean(ps)), 4)
        if split:
            scores[f"{name} PQFs"] = round(float(np.mean([p for t, p in enumerate(ps) if t in pqfs])), 4)
            scores[f"{name} between"] = round(float(np.mean([p for t, p in enumerate(ps) if t not in pqfs])), 4)
    model.train()
    return scores


def score_heldout(args: argparse.Namespace) -> dict:
    """The start and each saved arm on the card's held-out clips (``data/qe_test``, made by
    ``experiments/model_card.py qe``), stage 2 alone on the compressed frames."""
    clips = PairedClips(args.heldout, 2, 2).validation_clips(10**6)
    clips = [(n, lq, gt, sorted(p)) for n, lq, gt, p in clips]
    out = {"start": validate(Plain(load(args.init)), clips, 10**6, split=True)}
    print("start", out["start"], flush=True)
    for arm in args.arms:
        model = make_arm(arm, args.init)
        model.load_state_dict(torch.load(Path(args.save) / f"{arm}.pt"))
        out[arm] = validate(model, clips, 10**6, split=True)
        print(arm, out[arm], flush=True)
    return out


def train_arm(arm: str, args: argparse.Namespace, data: Triples, val: list) -> dict:
    torch.manual_seed(args.seed)
    model = make_arm(arm, args.init).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema))  # scored, as the trainer's EMA
    rec: dict = {"arm": arm, "start": validate(model, val, args.val_frames), "curve": []}
    t0 = time.time()
    for it in range(args.iters):
        warm = min(1.0, (it + 1) / max(1, args.iters // 20))
        lr = args.lr * warm * 0.5 * (1 + np.cos(np.pi * it / args.iters))
        for g in opt.param_groups:
            g["lr"] = lr
        x, a, b, gt = data.sample(args.batch, np.random.default_rng([args.seed, it]))
        loss = F.mse_loss(model(x, a, b), gt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
        if (it + 1) % args.every == 0 or it + 1 == args.iters:
            s = validate(ema.module, val, args.val_frames)
            mean = float(np.mean(list(s.values())))
            rec["curve"].append({"iter": it + 1, "loss": loss.item(), "val": s, "mean": mean})
            print(arm, it + 1, f"{time.time() - t0:.0f}s", s, flush=True)
    rec["seconds"] = round(time.time() - t0, 1)
    rec["end"] = rec["curve"][-1]["val"]
    if args.save:
        torch.save(ema.module.state_dict(), Path(args.save) / f"{arm}.pt")
        if arm == "plain":  # a stage-2 file as any other, for `model_card.py --stage2` and `restore --stage2`
            save(ema.module.base, Path(args.save) / "plain.safetensors")
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["data/qe_train8"], help="prepared training sets")
    ap.add_argument("--val", default="data/qe_val")
    ap.add_argument("--init", default="src/vrestore/weights/qe_fast_stage2.safetensors")
    ap.add_argument("--arms", nargs="+", default=["plain", "neighbours"])
    ap.add_argument("--iters", type=int, default=800)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-4)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--val-frames", type=int, default=40)
    ap.add_argument("--save", default=None, help="folder for each arm's state dict")
    ap.add_argument("--heldout", default=None,
                    help="score the arms saved in --save on this prepared set (data/qe_test) instead of training")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    keep_freed_memory()
    if args.heldout:
        Path(args.out).write_text(json.dumps({"args": vars(args), "heldout": score_heldout(args)}, indent=1))
        return
    if args.save:  # made before training, so a long run cannot end without a place for its weights
        Path(args.save).mkdir(parents=True, exist_ok=True)
    data = Triples(args.data, args.patch)
    val = PairedClips(args.val, 2, 2).validation_clips(args.val_frames)
    val = [(n, lq, gt, sorted(p)) for n, lq, gt, p in val]
    res = {"args": vars(args), "arms": [train_arm(a, args, data, val) for a in args.arms]}
    Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
