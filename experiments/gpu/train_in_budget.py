"""Train recipes side by side on one GPU, scaled to fit a wall-clock budget.

A lent GPU comes for minutes, not days (DEVELOPERS.md: 30 minutes a session,
10 a command). This driver times each recipe's first restoration step for a
few iterations (all recipes at once, as they will then run), scales every
step's iterations (and SPyNet's freeze) by one factor so that the recipe
ends before ``--until`` (a Unix time), trains the scaled recipes at once, each
in its own process, and copies each run's final weights, recipe (the scaled
one, as run) and log to ``--out``. The recipes' proportions, growth and
three loss steps are kept; only their length follows the measured speed.

    python experiments/gpu/train_in_budget.py --until $(( $(date +%s) + 480 )) \\
        configs/qe_basicvsrpp_c32n4_pqf_gpu.yaml configs/x4_basicvsrpp_c32n4_pqf_gpu.yaml --out OUT

Runs the trainer directly (no command-line layer): the GPU image's packages
are not this project's pins.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from vrestore.train.engine import FLOW_KIND, Trainer, load_recipe, step_kind


def train_worker(recipe: str, resume: bool) -> None:
    t = Trainer(load_recipe(recipe), resume=resume)
    try:
        print(f"{t.cfg.name}: {t.precision}, to {t.run()}", flush=True)
    finally:
        t.close()


def _spawn(recipe: Path, resume: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--worker", str(recipe)] + (["--resume"] if resume else []))


def _sec_per_iter(run: Path, skip: int) -> float:
    secs = [r["sec"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "sec" in r]
    return statistics.median(secs[skip:])


def probe(cfgs: list, iters: int) -> list[float]:
    """Seconds per restoration iteration of each recipe, all timed at once."""
    procs, runs = [], []
    for cfg in cfgs:
        p = copy.deepcopy(cfg)
        first = next(s for s in p.steps if step_kind(p, s) != FLOW_KIND)
        p.steps = [dict(OmegaConf.to_container(first), iters=iters)]
        p.out = f"runs/probe_{cfg.name}"
        p.val = {"every": 0}
        p.log = {"tensorboard": False}
        p.checkpoint_every = 10**9
        shutil.rmtree(p.out, ignore_errors=True)
        Path(p.out).mkdir(parents=True)
        OmegaConf.save(p, Path(p.out) / "probe.yaml")
        procs.append(_spawn(Path(p.out) / "probe.yaml"))
        runs.append(Path(p.out))
    if any(pr.wait() for pr in procs):
        sys.exit("a probe failed")
    return [_sec_per_iter(r, skip=iters // 3) for r in runs]


def scaled(cfg, factor: float):
    s = copy.deepcopy(cfg)
    for step in s.steps:
        step.iters = max(1, round(int(step.iters) * factor))
    if s.get("optim", {}).get("spynet_freeze"):
        s.optim.spynet_freeze = round(int(s.optim.spynet_freeze) * factor)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs="+", type=Path)
    ap.add_argument("--until", type=float, help="Unix time by which every run must have ended")
    ap.add_argument("--probe", type=int, default=30, help="iterations timed per recipe")
    ap.add_argument("--reserve", type=float, default=0.2, help="share of the time left kept for validation, "
                    "cheaper-than-timed steps' slack and the final exports")
    ap.add_argument("--max-factor", type=float, default=1.0, help="never run a recipe longer than this times")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return train_worker(str(a.recipes[0]), a.resume)
    cfgs = [load_recipe(r) for r in a.recipes]
    sec = probe(cfgs, a.probe)
    left = a.until - time.time()
    plans = []
    for cfg, s in zip(cfgs, sec, strict=True):
        total = sum(int(st.iters) for st in cfg.steps)
        factor = min(a.max_factor, left * (1 - a.reserve) / s / total)
        run = scaled(cfg, factor)
        Path(run.out).mkdir(parents=True, exist_ok=True)
        path = Path(run.out) / "scaled_recipe.yaml"
        OmegaConf.save(run, path)
        plans.append((run, path))
        print(f"{cfg.name}: {s * 1000:.0f} ms per iteration with all at once; {left:.0f} s left -> x{factor:.3f}, "
              f"{sum(int(st.iters) for st in run.steps)} iterations", flush=True)
    procs = [_spawn(path) for _, path in plans]
    while any(p.poll() is None for p in procs):
        time.sleep(30)
        for run, _ in plans:
            m = Path(run.out) / "metrics.jsonl"
            recs = [json.loads(x) for x in m.read_text().splitlines()] if m.exists() else []
            it = [r for r in recs if "loss" in r]
            val = [r for r in recs if r.get("val_psnr") is not None]
            print(f"  {run.name}: iteration {it[-1]['iter'] if it else 0}"
                  + (f", loss {it[-1]['loss']:.4f}" if it else "")
                  + (f", val {val[-1]['val_psnr']:.3f} dB at {val[-1]['iter']}" if val else ""), flush=True)
    codes = [p.returncode for p in procs]
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        for run, _ in plans:
            for f in ("final.safetensors", "recipe.yaml", "metrics.jsonl"):
                if (Path(run.out) / f).exists():
                    shutil.copy(Path(run.out) / f, a.out / f"{run.name}.{f}")
    if any(codes):
        sys.exit(f"exit codes {codes}")


if __name__ == "__main__":
    main()
