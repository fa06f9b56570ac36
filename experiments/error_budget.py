"""Where the held-out clips' remaining error lies: luma or chroma, PQFs or the frames between them.

    python experiments/error_budget.py [--stage1 PATH|none] [--stage2 PATH ...] [--data DIR [--clips ...]]
        [--frames N] [--out FILE]

Restores the held-out QE clips (as experiments/model_card.py prepares them; stage 2 of `qe-fast` alone by
default) and splits the squared error of the compressed input and of the output into luma and chroma
(BT.709, full range, in 8-bit code values), and into the peak-quality frames and the three between each
pair. What-ifs bound what each part could give: the output with the ground truth's chroma (luma kept), with
the input's chroma (what stage 2's chroma change is worth) and with its chroma blurred; the error 4:2:0
itself puts on the true chroma; and an oracle's fusion of each frame between PQFs with the previous PQF,
unaligned. Writes experiments/results/error_budget.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from model_card import TEST_FRAMES, frames  # the script's own folder: the card's clip preparation

from vrestore import metrics
from vrestore.infer.restorer import Restorer
from vrestore.video.colour import downsample_chroma, rgb_to_yuv444, upsample_chroma, yuv444_to_rgb
from vrestore.video.degrade import prepare_dataset

ROOT = Path(__file__).resolve().parents[1]


def _yuv(rgb: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) float code values."""
    return np.stack([rgb_to_yuv444(f / 255.0, "bt709", True) for f in rgb])


def _rgb(yuv: np.ndarray) -> np.ndarray:
    return np.stack([np.clip(np.round(yuv444_to_rgb(f, "bt709", True) * 255), 0, 255) for f in yuv]).astype(np.uint8)


def _mean_psnr(gt: np.ndarray, x: np.ndarray, idx) -> float:
    return float(np.mean([metrics.psnr(gt[i], x[i]) for i in idx]))


def budget(gt: np.ndarray, x: np.ndarray, g: np.ndarray, v: np.ndarray, pqfs: list[int]) -> dict:
    """Luma/chroma squared error (code values; ``g``, ``v``: ``gt`` and ``x`` through ``_yuv``) and mean
    RGB-PSNR on PQFs and on the frames between."""
    err = ((g - v) ** 2).mean(axis=(0, 2, 3))
    between = [i for i in range(len(gt)) if i not in set(pqfs)]
    return {"mse_y": float(err[0]), "mse_cb": float(err[1]), "mse_cr": float(err[2]),
            "psnr_rgb": _mean_psnr(gt, x, range(len(gt))), "psnr_rgb_pqf": _mean_psnr(gt, x, pqfs),
            "psnr_rgb_between": _mean_psnr(gt, x, between)}


def roundtrip_420(yuv: np.ndarray) -> list[float]:
    """Squared error that 4:2:0 down- and up-sampling alone puts on each chroma plane (the true frames':
    small when the source was 4:2:0 already, so the inputs' chroma error is compression)."""
    t, _, h, w = yuv.shape
    back = [[upsample_chroma(downsample_chroma(f[p], 2, 2), 2, 2, h, w) for f in yuv] for p in (1, 2)]
    return [float(((np.stack(b) - yuv[:, p]) ** 2).mean()) for p, b in zip((1, 2), back, strict=True)]


def blurred_chroma(yuv: np.ndarray, sigma: float) -> np.ndarray:
    """The frames with both chroma planes blurred (Gaussian): a plain classical chroma clean-up."""
    from scipy.ndimage import gaussian_filter

    out = yuv.copy()
    out[:, 1:] = gaussian_filter(yuv[:, 1:], (0, 0, sigma, sigma))
    return out


def _block_mse(g: np.ndarray, x: np.ndarray, block: int) -> np.ndarray:
    """Squared error per block x block tile (the bottom and right remainders left out)."""
    h, w = (g.shape[0] // block) * block, (g.shape[1] // block) * block
    e = ((g[:h, :w] - x[:h, :w]) ** 2).mean(-1)
    return e.reshape(h // block, block, w // block, block).mean(axis=(1, 3))


def oracle_fusion(gt: np.ndarray, lq: np.ndarray, pqfs: list[int], block: int = 8) -> float:
    """Mean RGB-PSNR of the frames between PQFs when an oracle picks, per block, the frame itself or its
    average with the previous PQF, unaligned: a bound on fusing frames without motion compensation."""
    out = []
    for i in range(len(gt)):
        prev = max((p for p in pqfs if p < i), default=None)
        if i in pqfs or prev is None:
            continue
        g, a = gt[i].astype(np.float64), lq[i].astype(np.float64)
        b = (a + lq[prev]) / 2
        out.append(10 * np.log10(255**2 / np.minimum(_block_mse(g, a, block), _block_mse(g, b, block)).mean()))
    return float(np.mean(out))


def main(stage1: str, stage2: list[str], out: Path, data: Path | None = None, clips: list[str] | None = None,
         max_frames: int = TEST_FRAMES) -> None:
    """``data``: a prepared QE set (default: the held-out clips, prepared as the card does); ``clips``: some
    of its clips (default: all); the first ``max_frames`` frames of each."""
    if data is None:
        data = ROOT / "data" / "qe_test"
        meta = prepare_dataset(ROOT / "data" / "clean_test", data, task="qe", max_frames=TEST_FRAMES)
    else:
        meta = json.loads((data / "meta.json").read_text())
    r = Restorer(None if stage1 == "none" else stage1, stage2, chunk=max_frames)
    res: dict = {"stage1": stage1, "stage2": stage2, "data": str(data), "frames_per_clip": max_frames,
                 "precision": r.engine, "clips": {}}
    for name in clips or list(meta["clips"]):
        c = meta["clips"][name]
        gt, lq = frames(data / c["gt"])[:max_frames], frames(data / c["lq"])[:max_frames]
        c = c | {"pqfs": [p for p in c["pqfs"] if p < len(lq)]}
        pred = np.stack(list(r.stream(list(lq), c["pqfs"])))
        g, o, q = _yuv(gt), _yuv(pred), _yuv(lq)
        true_chroma = _rgb(np.concatenate([o[:, :1], g[:, 1:]], axis=1))
        input_chroma = _rgb(np.concatenate([o[:, :1], q[:, 1:]], axis=1))
        every = range(len(gt))
        res["clips"][name] = {
            "input": budget(gt, lq, g, q, c["pqfs"]), "output": budget(gt, pred, g, o, c["pqfs"]),
            "output_with_true_chroma": _mean_psnr(gt, true_chroma, every),
            "output_with_input_chroma": _mean_psnr(gt, input_chroma, every),
            "output_with_chroma_blurred_sigma2": _mean_psnr(gt, _rgb(blurred_chroma(o, 2.0)), every),
            "truth_420_roundtrip_mse_cb_cr": roundtrip_420(g),
            "input_between_oracle_unaligned_fusion": oracle_fusion(gt, lq, c["pqfs"])}
        print(name, json.dumps(res["clips"][name], indent=1), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage1", default="none", help="stage-1 checkpoint, or none (the default): stage 2 alone")
    ap.add_argument("--stage2", nargs="+", default=[str(ROOT / "src/vrestore/weights/qe_fast_stage2.safetensors")],
                    help="stage-2 checkpoint(s), averaged if several (default: qe-fast's)")
    ap.add_argument("--data", type=Path, help="a prepared QE set (default: the held-out clips)")
    ap.add_argument("--clips", nargs="+", help="clips of --data (default: all)")
    ap.add_argument("--frames", type=int, default=TEST_FRAMES, help="first frames of each clip")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "error_budget.json")
    a = ap.parse_args()
    main(a.stage1, a.stage2, a.out, a.data, a.clips, a.frames)
