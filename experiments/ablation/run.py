"""The ablation study of issue 8: what each TaoMC2 strategy is worth at a scale
this CPU trains, on held-out real clips (QE, QP 37).

    python experiments/ablation/run.py all [--jobs 2] [--seeds 0 1]
    python experiments/ablation/run.py data|train|eval|report

``all`` builds the data, trains every recipe of ``recipes/`` (stage 1: the
baseline with two seeds and one variant per strategy; stage 2: transfer and
from scratch), evaluates, and writes ``results/*.json``, ``REPORT.md`` and the
plots. It resumes where it stopped: finished runs and evaluations are kept,
a killed run continues from its last checkpoint. Runs go to ``runs/`` (not
committed).

A variant recipe names its ``base`` recipe and lists only what it changes.
Every run trains the same number of iterations as its reference.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA, RUNS, RESULTS = HERE / "data", HERE / "runs", HERE / "results"
RECIPES = HERE / "recipes"
SEGMENTS = 3  # per test clip: the spread of a difference is over these segments of the held-out clips
DUP_CLIPS = ("photo_astronaut", "photo_chelsea", "photo_rocket", "photo_brick")  # 4 of 12, as ~30% in LDV

STAGE1 = ["s1_baseline", "s1_direct", "s1_charb_only", "s1_nopqf", "s1_dedup"]
STAGE2 = ["s2_transfer", "s2_scratch"]


# -- data ----------------------------------------------------------------------
def with_repeats(frames: np.ndarray, seed: int, every: int = 5) -> np.ndarray:
    """Insert a repeat of every ``every``-th frame, as frame-rate conversion
    does; the copy differs from its original by +-1 on 2% of its samples
    (LDV's originals "differ slightly"), so only compression makes them equal."""
    rng = np.random.default_rng(seed)
    out = []
    for i, f in enumerate(frames):
        out.append(f)
        if i % every == every - 3:
            bump = (rng.random(f.shape) < 0.02) * rng.choice(np.array([-1, 1], np.int16), f.shape)
            out.append(np.clip(f.astype(np.int16) + bump, 0, 255).astype(np.uint8))
    return np.stack(out)


def _write(path: Path, frames: np.ndarray, fps: float = 25) -> None:
    from vrestore.video.io import VideoWriter

    with VideoWriter(path, fps=fps, codec="ffv1", overwrite=True) as w:
        for f in frames:
            w.write(f)


def _read(path: Path, n: int | None = None) -> np.ndarray:
    from vrestore.video.io import VideoReader

    return np.stack([f.rgb for f in VideoReader(path, max_frames=n)])


def build_data() -> None:
    """Clean sources -> LDV pairs: train (12 clips, 4 with repeated frames),
    val (2 pseudo-videos), test (Big Buck Bunny centre 640x352 and carphone,
    60 frames each) and test_dup (the test clips with repeated frames)."""
    from vrestore.data.sources import PHOTOS, VALIDATION_PHOTOS, sample_clip, write_clean_sources
    from vrestore.video.degrade import prepare_dataset

    clean = DATA / "clean"
    train_photos = tuple(p for p in PHOTOS if p not in VALIDATION_PHOTOS)
    write_clean_sources(clean / "train", photos=train_photos, clips=("bikes",))
    for name in DUP_CLIPS:
        p = clean / "train" / f"{name}.mkv"
        marker = p.with_suffix(".repeats")
        if not marker.exists():
            _write(p, with_repeats(_read(p), seed=len(name)))
            marker.touch()
    # REPORT.md's run validated on the two greyscale photographs; `logo` joined VALIDATION_PHOTOS later
    write_clean_sources(clean / "val", photos=tuple(p for p in VALIDATION_PHOTOS if p != "logo"), clips=())
    (clean / "test").mkdir(parents=True, exist_ok=True)
    (clean / "test_dup").mkdir(parents=True, exist_ok=True)
    for name in ("bigbuckbunny", "carphone"):
        if (clean / "test_dup" / f"{name}.mkv").exists():
            continue
        frames = _read(sample_clip(name), 60)
        if name == "bigbuckbunny":  # centre 640x352 of the 1280x720 clip: 4x cheaper to evaluate
            frames = frames[:, 184:536, 320:960]
        _write(clean / "test" / f"{name}.mkv", frames)
        _write(clean / "test_dup" / f"{name}.mkv", with_repeats(frames, seed=1))
    for split in ("train", "val", "test", "test_dup"):
        prepare_dataset(clean / split, DATA / split, task="qe", qp=37)
    meta = json.loads((DATA / "test_dup" / "meta.json").read_text())
    for name in meta["clips"]:
        lq = _read(DATA / "test_dup" / meta["clips"][name]["lq"])
        same = sum(np.array_equal(lq[i], lq[i - 1]) for i in range(1, len(lq)))
        print(f"test_dup/{name}: {len(lq)} frames, {same} identical to their predecessor after decoding")


# -- training ------------------------------------------------------------------
def recipe(name: str, seed: int):
    from vrestore.train.engine import load_recipe

    cfg = load_recipe(RECIPES / f"{name}.yaml")
    run = f"{name}_seed{seed}"
    cfg.name, cfg.seed, cfg.out = run, seed, str(RUNS / run)
    return cfg


def train_one(name: str, seed: int) -> str:
    """Train (or finish) one run in this process, on one thread."""
    import torch

    from vrestore.train.engine import Trainer

    torch.set_num_threads(1)
    os.chdir(ROOT)
    cfg = recipe(name, seed)
    out = Path(cfg.out)
    if (out / "final.safetensors").exists():
        return f"{cfg.name}: done before"
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(filename=out / "train.log", level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(message)s")
    t = time.time()
    Trainer(cfg, resume=True, device="cpu", dtype="auto").run()
    return f"{cfg.name}: trained in {time.time() - t:.0f} s"


def train_time(run: str) -> float:
    """Seconds of training steps (validation and checkpoints excluded)."""
    recs = [json.loads(ln) for ln in (RUNS / run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return float(sum(r.get("sec", 0.0) for r in recs if "loss" in r))


def val_curve(run: str) -> list[tuple[int, float, float]]:
    """(iteration, seconds of training so far, validation PSNR)."""
    out, sec = [], 0.0
    for ln in (RUNS / run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(ln)
        sec += r.get("sec", 0.0) if "loss" in r else 0.0
        if isinstance(r.get("val_psnr"), (int, float)):
            out.append((int(r["iter"]), sec, float(r["val_psnr"])))
    return out


# -- evaluation ------------------------------------------------------------------
def evaluations(seeds: list[int]) -> dict[str, dict]:
    """label -> what to run: stage-1 runs (several = ensemble), stage 2, TTA,
    test-time dedup, test set."""
    w = lambda run: str(RUNS / run / "final.safetensors")  # noqa: E731
    ev: dict[str, dict] = {"input": {"stage1": [], "set": "test"}, "input_dup": {"stage1": [], "set": "test_dup"}}
    for n in STAGE1:
        ev[f"{n}_seed{seeds[0]}"] = {"stage1": [w(f"{n}_seed{seeds[0]}")], "set": "test"}
    for s in seeds[1:]:
        ev[f"s1_baseline_seed{s}"] = {"stage1": [w(f"s1_baseline_seed{s}")], "set": "test"}
    b0 = w(f"s1_baseline_seed{seeds[0]}")
    ev["s1_baseline_tta"] = {"stage1": [b0], "tta": True, "set": "test"}
    if len(seeds) > 1:
        ev["s1_baseline_ensemble"] = {"stage1": [w(f"s1_baseline_seed{s}") for s in seeds[:2]], "set": "test"}
    for n in STAGE2:
        ev[f"{n}"] = {"stage1": [b0], "stage2": w(f"{n}_seed0"), "set": "test"}
    ev["dup_baseline"] = {"stage1": [b0], "set": "test_dup"}
    ev["dup_baseline_testdedup"] = {"stage1": [b0], "dedup": True, "set": "test_dup"}
    ev["dup_dedup_model_testdedup"] = {"stage1": [w(f"s1_dedup_seed{seeds[0]}")], "dedup": True, "set": "test_dup"}
    return ev


def eval_one(label: str, spec: dict) -> str:
    """Restore every clip of the test set; keep per-frame RGB-PSNR (NTIRE protocol)."""
    import torch

    from vrestore.data.pairs import PairedClips
    from vrestore.infer.restorer import Restorer
    from vrestore.metrics import score_video

    torch.set_num_threads(1)
    os.chdir(ROOT)
    dst = RESULTS / "eval" / f"{label}.json"
    if dst.exists():
        return f"{label}: done before"
    clips = PairedClips(DATA / spec["set"], 2, 2)
    r = None
    if spec["stage1"]:
        r = Restorer(spec["stage1"], spec.get("stage2"), tta=spec.get("tta", False), device="cpu", dtype="auto",
                     chunk=100, dedup=spec.get("dedup", False))
    res, t = {"spec": spec, "clips": {}}, time.time()
    for c in clips.clips:
        pqfs = sorted(c.pqfs)
        out = c.lq if r is None else r.restore_frames(c.lq, pqfs)
        s = score_video(c.gt, out, c.name, with_ssim=False)
        res["clips"][c.name] = {"frames": s.frames, "psnr_rgb": s.psnr_rgb}
    res["seconds"] = time.time() - t
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(res))
    return f"{label}: evaluated in {res['seconds']:.0f} s"


def segments(label: str) -> np.ndarray:
    """Mean RGB-PSNR of each of the SEGMENTS segments of each test clip."""
    res = json.loads((RESULTS / "eval" / f"{label}.json").read_text())
    out = []
    for name in sorted(res["clips"]):
        c = res["clips"][name]
        fr, ps = np.array(c["frames"]), np.array(c["psnr_rgb"])
        n = int(fr.max()) + 1 if len(fr) else 0
        seg = int(np.ceil(n / SEGMENTS))
        out += [ps[(fr >= a) & (fr < a + seg)].mean() for a in range(0, n, seg)]
    return np.array(out)


# -- report ------------------------------------------------------------------------
PAPER = {  # METHOD.md section 5 and sections 2-4: the authors' gains (dB)
    "growth": "+0.128", "mse": "+0.028", "pqf": "+0.05 to 0.1", "stage2": "+0.11", "transfer": "+0.04",
    "dedup": "+0.014", "tta": "+0.13", "ensemble": "used (gain not given)",
}


def report(seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s0 = seeds[0]
    seg = {label: segments(label) for label in evaluations(seeds)}
    inp = seg["input"].mean()

    def delta(a: str, b: str) -> dict:
        d = seg[a] - seg[b]
        return {"mean": float(d.mean()), "std": float(d.std(ddof=1)), "n": int(len(d)), "a": a, "b": b}

    rows = []

    def row(key: str, what: str, a: str, b: str, runs: list[str]) -> None:
        d = delta(a, b)
        t = {r: train_time(r) for r in runs}
        # the sign counts only where the mean is clear of its 95 % interval over segments and of 0.001 dB
        resolved = abs(d["mean"]) > max(2 * d["std"] / np.sqrt(d["n"]), 0.001)
        sign = ("yes" if d["mean"] > 0 else "no") if resolved else "no effect resolved"
        rows.append({"key": key, "what": what, **d, "train_s": t, "paper": PAPER.get(key, ""), "agrees": sign})

    b = f"s1_baseline_seed{s0}"
    row("growth", "progressive growth 2->4->6 vs 6 blocks directly", b, f"s1_direct_seed{s0}",
        [b, f"s1_direct_seed{s0}"])
    row("mse", "Charbonnier then MSE vs Charbonnier only", b, f"s1_charb_only_seed{s0}",
        [b, f"s1_charb_only_seed{s0}"])
    row("pqf", "PQF propagation vs plain second order", b, f"s1_nopqf_seed{s0}", [b, f"s1_nopqf_seed{s0}"])
    row("stage2", "stage 1 + stage 2 (transfer) vs stage 1 alone", "s2_transfer", b, ["s2_transfer_seed0"])
    row("transfer", "stage 2 from denoising weights vs from scratch", "s2_transfer", "s2_scratch",
        ["s2_transfer_seed0", "s2_scratch_seed0"])
    row("dedup", "dedup in training and testing vs none (clips with repeats)", "dup_dedup_model_testdedup",
        "dup_baseline", [f"s1_dedup_seed{s0}", b])
    row("dedup_test", "dedup at test time only (baseline model, clips with repeats)", "dup_baseline_testdedup",
        "dup_baseline", [b])
    row("tta", "x8 TTA vs none (stage 1)", "s1_baseline_tta", b, [b])
    if len(seeds) > 1:
        b1 = f"s1_baseline_seed{seeds[1]}"
        row("ensemble", "ensemble of two stage-1 seeds vs seed 0 alone", "s1_baseline_ensemble", b, [b, b1])
        seed_noise = delta(b1, b)
    else:
        seed_noise = None
    stage1_vs_input = {k: float((seg[k] - seg["input"]).mean()) for k in seg if k.startswith("s")}
    runs = [f"{n}_seed{s0}" for n in STAGE1] + [f"s1_baseline_seed{s}" for s in seeds[1:]]
    curves = {r: val_curve(r) for r in runs + [f"{n}_seed0" for n in STAGE2]}
    reach = _time_to_reach(curves["s2_transfer_seed0"], curves["s2_scratch_seed0"])
    summary = {"input_psnr": float(inp), "segments": len(seg["input"]), "rows": rows, "seed_noise": seed_noise,
               "vs_input": stage1_vs_input, "stage2_time_to_reach": reach, "val_curves": curves,
               "eval_seconds": {k: json.loads((RESULTS / "eval" / f"{k}.json").read_text())["seconds"] for k in seg}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ablation.json").write_text(json.dumps(summary, indent=1))

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    ks = [r["key"] for r in rows]
    ax[0].barh(ks, [r["mean"] for r in rows], xerr=[r["std"] for r in rows], color="tab:blue", alpha=0.8)
    if seed_noise:
        for x in (-abs(seed_noise["mean"]), abs(seed_noise["mean"])):
            ax[0].axvline(x, color="grey", ls=":", lw=1)
    ax[0].axvline(0, color="k", lw=0.8)
    ax[0].set_xlabel("ΔPSNR (RGB, dB), mean ± std over test segments")
    ax[0].invert_yaxis()
    for r, c in curves.items():
        if r.startswith("s1_"):
            it, _, p = zip(*c, strict=True)
            ax[1].plot(it, p, label=r, lw=1.2)
    ax[1].set_xlabel("iteration")
    ax[1].set_ylabel("validation RGB-PSNR (dB)")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "ablation.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in ("s2_transfer_seed0", "s2_scratch_seed0"):
        _, sec, p = zip(*curves[r], strict=True)
        ax.plot(sec, p, marker=".", label=r)
    ax.set_xlabel("training seconds (1 CPU thread)")
    ax.set_ylabel("validation RGB-PSNR on stage-1 outputs (dB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "stage2_transfer.png", dpi=110)
    write_report(summary)


def _time_to_reach(transfer: list, scratch: list) -> dict:
    """Training seconds each stage-2 run needs to reach the higher of the two
    final validation PSNRs (None: never within its budget)."""
    target = max(transfer[-1][2], scratch[-1][2])
    first = lambda c: next((sec for it, sec, p in c if it > 0 and p >= target), None)  # noqa: E731
    return {"target_psnr": target, "transfer_s": first(transfer), "scratch_s": first(scratch),
            "transfer_final": transfer[-1][2], "scratch_final": scratch[-1][2]}


def write_report(s: dict) -> None:
    lines = (HERE / "REPORT.template.md").read_text()
    table = ["| strategy | ΔPSNR (dB), mean ± std | segments | training time (s) | paper | same sign |",
             "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        tt = ", ".join(f"{k.replace('_seed0', '')}: {v:.0f}" for k, v in r["train_s"].items())
        sign = r["agrees"]
        table.append(f"| {r['what']} | {r['mean']:+.3f} ± {r['std']:.3f} | {r['n']} | {tt} | {r['paper']} | {sign} |")
    n = s["seed_noise"]
    noise = (f"Seed noise (baseline seed 1 − seed 0, same recipe): {n['mean']:+.3f} ± {n['std']:.3f} dB."
             if n else "Only one seed was run.")
    vs = "\n".join(f"| {k} | {v:+.3f} |" for k, v in sorted(s["vs_input"].items()))
    r = s["stage2_time_to_reach"]
    fmt = lambda x: "never, within its budget" if x is None else f"after {x:.0f} s of training"  # noqa: E731
    reach = (f"target {r['target_psnr']:.3f} dB (the higher final validation PSNR): transfer reaches it "
             f"{fmt(r['transfer_s'])} (pre-training included), scratch {fmt(r['scratch_s'])}; "
             f"finals {r['transfer_final']:.3f} vs {r['scratch_final']:.3f} dB.")
    text = (lines.replace("{{TABLE}}", "\n".join(table)).replace("{{SEED_NOISE}}", noise)
            .replace("{{VS_INPUT}}", vs).replace("{{INPUT}}", f"{s['input_psnr']:.3f}")
            .replace("{{REACH}}", reach).replace("{{SEGMENTS}}", str(s["segments"]))
            .replace("{{READING}}", _reading()))
    (HERE / "REPORT.md").write_text(text)


def _reading() -> str:
    """The interpretation, written by a person after looking at the numbers (READING.md)."""
    p = HERE / "READING.md"
    return p.read_text().strip() if p.exists() else "Not written yet: run `report` again after writing READING.md."


# -- driver ------------------------------------------------------------------------
def _pool(jobs: int, fn, args: list[tuple]) -> None:
    """Run ``fn(*a)`` for each ``a``, ``jobs`` at a time; stopping the driver
    (Ctrl-C, SIGTERM) stops its workers too, and a rerun resumes them."""
    if not args:
        return
    pool = multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=1)
    try:
        for msg in pool.starmap(fn, args, chunksize=1):
            print(msg, flush=True)
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def _stop(*_: object) -> None:
    """SIGTERM: stop the workers with the driver (a rerun resumes them)."""
    for p in multiprocessing.active_children():
        p.terminate()
    sys.exit(143)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["all", "data", "train", "eval", "report"])
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one CPU thread each")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the stage-1 runs")
    a = ap.parse_args(argv)
    os.chdir(ROOT)
    signal.signal(signal.SIGTERM, _stop)
    if a.what in ("all", "data"):
        build_data()
    if a.what in ("all", "train"):
        first = [("s1_baseline", a.seeds[0])]
        rest = [(n, s) for s in a.seeds for n in STAGE1 if (n, s) != first[0]]
        rest = [r for r in rest if r[0] == "s1_baseline" or r[1] == a.seeds[0]]  # variants: first seed
        _pool(a.jobs, train_one, first + rest[:1])  # stage 2 needs the baseline early
        _pool(a.jobs, train_one, rest[1:] + [(n, 0) for n in STAGE2])
    if a.what in ("all", "eval"):
        _pool(a.jobs, eval_one, list(evaluations(a.seeds).items()))
    if a.what in ("all", "report"):
        report(a.seeds)


if __name__ == "__main__":
    sys.exit(main())
