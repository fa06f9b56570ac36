"""Does a recurrent model stay stable over long windows?

A BasicVSR++ trained on short clips may let its propagated features drift as
a window grows; ``vrestore restore --chunk`` and the model card (60-frame
windows) then score worse than short windows. This restores one held-out clip
of a prepared set (``data/qe_test`` or ``data/x4_test``, made by
``experiments/model_card.py``) with windows of 8, 16, 32 and 60 frames (``--windows``) and
prints RGB-PSNR (NTIRE protocol), over the clip and its last 10 frames.

    python experiments/window_drift.py data/x4_test clip_carphone MODEL [MODEL ...]
"""

from __future__ import annotations

import argparse

import numpy as np

from vrestore import metrics
from vrestore.data.pairs import PairedClips
from vrestore.infer.restorer import Restorer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("clip")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--frames", type=int, default=60)
    ap.add_argument("--windows", default="8,16,32,60", help="window lengths, comma-separated")
    a = ap.parse_args()
    clips = {c[0]: c for c in PairedClips(a.data, 2, 2).validation_clips(a.frames)}
    _, lq, gt, pqfs = clips[a.clip]
    for model in a.models:
        for chunk in (int(w) for w in a.windows.split(",")):
            r = Restorer(model, chunk=chunk, overlap=min(8, chunk // 2))
            v = metrics.score_video(gt, np.stack(list(r.stream(list(np.array(lq)), pqfs))), a.clip, with_ssim=False)
            print(f"{model}  {a.clip}  window {chunk:2d}: {np.mean(v.psnr_rgb):.3f} dB, "
                  f"last 10 frames {np.mean(v.psnr_rgb[-10:]):.2f}", flush=True)


if __name__ == "__main__":
    main()
