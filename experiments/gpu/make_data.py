"""Build the training and validation sets of the GPU recipes on a many-core
machine: the clean sources of docs/models.md (Data) with 8 variants per
photograph, written one photograph per process, then `prepare` for `qe` and
`x4` with one video per process, then every clip decoded once into the sets'
frame stores (``vrestore.data.pairs.decoded_frames``), also in parallel, so
the trainers start at once. Idempotent: finished files are kept.

    python experiments/gpu/make_data.py [--jobs 16] [--tasks qe x4]

The same sets as the serial commands of docs/models.md (`write_clean_sources(...,
variants=8)`, `vrestore prepare`): the parallelism changes no pixel.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from vrestore.data.pairs import decoded_frames
from vrestore.data.sources import PHOTOS, VALIDATION_PHOTOS, write_clean_sources
from vrestore.video.degrade import prepare_dataset

TRAIN_PHOTOS = tuple(p for p in PHOTOS if p not in VALIDATION_PHOTOS)


def _one_thread() -> None:
    """Worker start: one thread each. Sixteen processes each running torch's
    default of one thread per core oversubscribe the machine. With that
    default, the first GPU session's data build and probes took over 8 of its
    9 minutes (not broken down: its log was lost); whether one thread per
    worker is the whole remedy is for the next GPU session to measure."""
    import torch

    torch.set_num_threads(1)


def _sources(job: tuple[str, tuple[str, ...], tuple[str, ...], int]) -> int:
    folder, photos, clips, variants = job
    return len(write_clean_sources(Path(folder), photos=photos, clips=clips, variants=variants))


def _decode(job: tuple[str, str]) -> int:
    return len(decoded_frames(Path(job[0]), job[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--root", type=Path, default=Path("data"))
    ap.add_argument("--tasks", nargs="+", choices=("qe", "x4"), default=["qe", "x4"],
                    help="the sets to build (a run of qe recipes only needs no x4 sets)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    train, val = a.root / "clean_train8", a.root / "clean_val"
    jobs = [(str(train), (p,), (), 8) for p in TRAIN_PHOTOS] + [(str(train), (), ("bikes",), 0)]
    jobs += [(str(val), (p,), (), 0) for p in VALIDATION_PHOTOS]
    with ProcessPoolExecutor(a.jobs, initializer=_one_thread) as pool:
        n = sum(pool.map(_sources, jobs))
    print(f"clean sources: {n} videos, {time.perf_counter() - t0:.0f} s", flush=True)
    sets = [(src, f"{task}_{part}", task) for task in a.tasks for src, part in ((train, "train8"), (val, "val"))]
    for src, name, task in sets:
        prepare_dataset(src, a.root / name, task=task, jobs=a.jobs)
        print(f"{name}: prepared, {time.perf_counter() - t0:.0f} s", flush=True)
    decode = []
    for _, name, _ in sets:
        root = a.root / name
        for clip in json.loads((root / "meta.json").read_text())["clips"].values():
            decode += [(str(root), clip["gt"]), (str(root), clip["lq"])]
    with ProcessPoolExecutor(a.jobs, initializer=_one_thread) as pool:
        frames = sum(pool.map(_decode, decode, chunksize=4))
    print(f"decoded {len(decode)} videos ({frames} frames), {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
