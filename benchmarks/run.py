"""Speed and memory benchmarks; results go to benchmarks/results/*.json and
benchmarks/RESULTS.md (regenerated from the JSON files).

    python benchmarks/run.py dcn        # deformable conv vs conv2d (the <= 3x target)
    python benchmarks/run.py stage1     # BasicVSR++ c64n7 frames/s, QE 960x536 and x4 from 240x136
    python benchmarks/run.py stage2     # SwinIR frames/s at 960x536 (published M size and small ones)
    python benchmarks/run.py attention  # SwinIR-T's window attention at 960x536 by heads: flash SDPA vs ours, bf16
    python benchmarks/run.py memory     # peak RSS, 48 vs 480 frames of 854x480, streaming vs whole
    python benchmarks/run.py speed      # end to end c64n7 at 960x536: ours vs fp32 whole-sequence eager
    python benchmarks/run.py bundled    # the bundled same-size models as `restore` runs them, 854x480
    python benchmarks/run.py stream     # the same over 96 frames: the steady state with the windows' shared frames
    python benchmarks/run.py long_video # stage 1's compiled DCN sampling: saving per frame, compile cost, break-even
    python benchmarks/run.py stage2_depth   # bundled pipelines vs stage 2s grown by a third group, 854x480
    python benchmarks/run.py quality_modes  # stage-2 TTA (2, 8), stage-2 ensembles (qe-hq) vs the bundled, 854x480
    python benchmarks/run.py swin1080   # SwinIR-M on one 1080p frame: time and peak memory
    python benchmarks/run.py chunks     # chunked vs whole-sequence outputs (bundled model), per frame
    python benchmarks/run.py onnx       # onnxruntime (CPU) vs torch fp32 and bf16, per stage, 960x536
    python benchmarks/run.py load       # 20 clips, 2 concurrent `restore` processes on one folder: checked
    python benchmarks/run.py train      # training it/s, small QE recipes: bf16, channels-last, compile vs fp32
    python benchmarks/run.py gpu        # the bundled models on a CUDA GPU: frames/s, peak GPU memory
    python benchmarks/run.py report     # rewrite RESULTS.md

Run on an otherwise idle machine; each measurement states its precision,
threads and machine. Measurements of vrestore's own engine run with the heap
that keeps freed memory mapped, as the ``vrestore`` command does; the
baselines that stand for the straightforward way use glibc's default.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).parent
RESULTS = HERE / "results"


def _timeit(fn, repeat: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def _child(args: list[str], malloc: str = "kept", env: dict[str, str] | None = None):
    """The JSON a child process prints last (``python ARGS`` with ``VRESTORE_MALLOC=malloc``: "system" leaves
    glibc's allocator as it is; otherwise freed memory stays mapped, see
    vrestore.infer.device.keep_freed_memory; ``env``: more variables). Each allocator setting needs its own
    process."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True,
                         env=os.environ | {"VRESTORE_MALLOC": malloc} | (env or {}))
    lines = out.stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith(("{", "[")))
    return json.loads("\n".join(lines[start:]))


def _save(name: str, data: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    data["env"] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": _cpu(),
                   "heap": "system" if os.environ.get("VRESTORE_MALLOC") == "system" else "kept",
                   "date": time.strftime("%Y-%m-%d")}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(json.dumps(data, indent=1))


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def dcn() -> None:
    """The deformable conv against a conv2d of the same shape, in a child process
    per allocator setting (glibc's default, and the kept heap the CLI uses)."""
    rows = [row for malloc in ("system", "kept") for row in _child([__file__, "_dcn_rows"], malloc)]
    _save("dcn", {"shape": "in 128 ch (2x64), out 64, 16 deform groups, 3x3, 180x320, forward", "rows": rows})


def _dcn_rows() -> None:
    from vrestore.infer.device import keep_freed_memory
    from vrestore.models.dcn import modulated_deform_conv2d

    kept = keep_freed_memory()
    torch.manual_seed(0)
    rows = []
    for dtype in ("fp32", "bf16"):
        for cl in (False, True):
            x = torch.randn(1, 128, 180, 320)  # 2*64 input channels, as in BasicVSR++'s alignment
            w = torch.randn(64, 128, 3, 3) * 0.05
            b = torch.zeros(64)
            off = torch.randn(1, 2 * 16 * 9, 180, 320) * 2
            mask = torch.rand(1, 16 * 9, 180, 320)
            conv = torch.nn.Conv2d(128, 64, 3, 1, 1).eval()
            if cl:  # the CPU model's layout: input, offsets and mask all channels-last
                x, off, mask = (t.contiguous(memory_format=torch.channels_last) for t in (x, off, mask))
                conv = conv.to(memory_format=torch.channels_last)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else torch.no_grad()
            with torch.no_grad(), ctx:
                t_conv = _timeit(lambda x=x, conv=conv: conv(x), repeat=9)
                for sampler in ("grid_sample", "gather"):  # gather: the first call compiles, _timeit's warm-up
                    t_dcn = _timeit(lambda x=x, w=w, b=b, off=off, mask=mask, s=sampler: modulated_deform_conv2d(
                        x, off, mask, w, b, 1, 1, 1, 1, 16, sampler=s), repeat=9)
                    rows.append({"malloc": "kept" if kept else "system", "dtype": dtype, "channels_last": cl,
                                 "sampler": sampler, "dcn_ms": t_dcn * 1e3, "conv_ms": t_conv * 1e3,
                                 "ratio": t_dcn / t_conv})
    print(json.dumps(rows))


def _stage1_fps(name: str, w: int, h: int, dtype: str, sampler: str | None = None, frames: int = 10) -> float:
    from vrestore.infer.restorer import Restorer
    from vrestore.models import build
    from vrestore.models.dcn import set_sampler

    model = build(name)
    set_sampler(model, sampler)
    r = Restorer(model, device="cpu", dtype=dtype, chunk=frames, overlap=0)
    clip = torch.rand(frames, 3, h, w)
    r.run_clip(clip[:2])
    t = time.perf_counter()
    r.run_clip(clip)
    return frames / (time.perf_counter() - t)


def stage1() -> None:
    """Both DCN samplers, so the two rows of each setting are taken on the same machine and day."""
    rows = []
    for name, (w, h) in (("basicvsrpp_c64n7_x1", (960, 536)), ("basicvsrpp_c64n7_x4", (240, 136))):
        for dtype in ("fp32", "bf16"):
            for sampler in ("grid_sample", "gather"):
                rows.append({"model": name, "input": f"{w}x{h}", "dtype": dtype, "dcn_sampler": sampler,
                             "fps": _stage1_fps(name, w, h, dtype, sampler)})
    _save("stage1", {"clip_frames": 10, "rows": rows})


def stage2() -> None:
    from vrestore.infer.restorer import Restorer
    from vrestore.models import build

    rows = []
    for name, n in (("swinir_t_color_dn", 3), ("swinir_t2_color_dn", 3), ("swinir_s_color_dn", 2),
                    ("swinir_m_color_dn", 1)):
        for dtype in ("fp32", "bf16"):
            m = build(name).eval()
            r = Restorer(build("basicvsrpp_c16n2_x1"), m, device="cpu", dtype=dtype)
            x = torch.rand(1, 3, 536, 960)
            with torch.inference_mode():
                r._stage2(x[:, :, :64, :64])
                t = time.perf_counter()
                for _ in range(n):
                    r._stage2(x)
                dt = (time.perf_counter() - t) / n
            rows.append({"model": name, "params_m": sum(p.numel() for p in m.parameters()) / 1e6, "dtype": dtype,
                         "sec_per_frame": dt, "fps": 1 / dt})
    _save("stage2", {"input": "960x536", "rows": rows})


def attention() -> None:
    """The window attention of one SwinIR-T block (32 channels, 8x8 windows,
    a 960x536 frame, bf16, in the model's chunks of 4096 windows) by head
    count and kernel: the CPU's ``scaled_dot_product_attention`` (a flash
    kernel) against ``models.swinir.window_attention`` (batched matmuls and a
    softmax, what the model runs since 2026-11-23)."""
    import torch.nn.functional as F

    from vrestore.models.swinir import SwinTransformerBlock, window_attention

    bw, n, c = (536 // 8) * (960 // 8), 64, 32
    step = SwinTransformerBlock.chunk_windows
    kernels = {"sdpa": lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b),
               "window_attention": window_attention}
    rows = []
    for heads in (4, 2, 1):
        torch.manual_seed(0)
        q, k, v = (torch.randn(bw, heads, n, c // heads, dtype=torch.bfloat16) for _ in range(3))
        bias = torch.randn(1, heads, n, n, dtype=torch.bfloat16)
        for kernel, fn in kernels.items():
            def block(fn=fn, q=q, k=k, v=v, bias=bias) -> None:
                for i in range(0, bw, step):
                    fn(q[i: i + step], k[i: i + step], v[i: i + step], bias)

            with torch.inference_mode():
                dt = _timeit(block)
            rows.append({"heads": heads, "head_dim": c // heads, "windows": bw, "kernel": kernel,
                         "sec_per_block": dt})
    for r in rows:
        r["speedup_vs_sdpa_4_heads"] = rows[0]["sec_per_block"] / r["sec_per_block"]
    _save("attention", {"input": "960x536", "rows": rows})


def swin1080() -> None:
    """The published SwinIR-M size on one 1080p frame (bf16, channels_last): it fits in memory."""
    import resource

    from vrestore.models import build

    m = build("swinir_m_color_dn").eval().to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 1080, 1920)
    t = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    _save("swin1080", {"shape": list(y.shape), "seconds": time.perf_counter() - t,
                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                       "finite": bool(torch.isfinite(y).all())})


def chunks() -> None:
    """Chunked streaming vs whole-sequence inference with the bundled model on the
    LDV-compressed demo clip: per-frame PSNR between the two outputs."""
    import tempfile

    import numpy as np

    from vrestore.infer.restorer import Restorer
    from vrestore.metrics import psnr
    from vrestore.video.degrade import degrade_video
    from vrestore.video.io import VideoReader
    from vrestore.weights import bundled_path

    sample = Path(__file__).resolve().parents[1] / "src" / "vrestore" / "assets" / "bbb_demo.mp4"
    with tempfile.TemporaryDirectory() as d:
        rep = degrade_video(sample, Path(d) / "lq.mp4")
        lq = np.stack([f.rgb for f in VideoReader(Path(d) / "lq.mp4")])
    model = bundled_path("qe")
    whole = Restorer(model, chunk=len(lq)).restore_frames(lq, rep.pqfs)
    chunk, overlap = 16, 4
    part = Restorer(model, chunk=chunk, overlap=overlap).restore_frames(lq, rep.pqfs)
    per = [psnr(a, b) for a, b in zip(whole, part, strict=True)]
    finite = [p for p in per if np.isfinite(p)]
    _save("chunks", {"model": "qe (bundled)", "frames": len(lq), "chunk": chunk, "overlap": overlap,
                     "mean_psnr_chunked_vs_whole": float(np.mean(finite)) if finite else float("inf"),
                     "min_psnr": float(min(per)), "identical_frames": int(sum(not np.isfinite(p) for p in per)),
                     "per_frame_psnr": [round(float(p), 2) if np.isfinite(p) else "inf" for p in per]})


def _subprocess(args: list[str], malloc: str = "kept", env: dict[str, str] | None = None) -> dict:
    """`vrestore bench` in a child process."""
    return _child(["-m", "vrestore.cli", "bench", *args], malloc, env)


def long_video() -> None:
    """What compiling stage 1's deformable sampling costs and saves, the measurement behind `restore` doing it
    by itself for long videos (vrestore.infer.restorer.COMPILED_DCN_FROM): steady frames/s with either
    sampler, and the extra seconds of a first run that compiles (a fresh inductor cache) or finds it cached."""
    from vrestore.infer.restorer import COMPILED_DCN_FROM

    def bench(model: str, stage2: str, size: str, sampler: str, frames: int, warmup: int, **env) -> dict:
        return _subprocess(["--model", model, "--stage2", stage2, "--size", size, "--frames", str(frames),
                            "--warmup", str(warmup)], env={"VRESTORE_DCN_SAMPLER": sampler, **env})

    rows = []
    for model, stage2, size in (("qe", "none", "854x480"), ("qe", "auto", "854x480"), ("x4", "none", "214x120")):
        fps = {s: bench(model, stage2, size, s, 20, 4)["fps"] for s in ("grid_sample", "auto")}
        rows.append({"model": model, "stage2": stage2, "input": size, "fps_grid_sample": fps["grid_sample"],
                     "fps_compiled": fps["auto"], "speedup": fps["auto"] / fps["grid_sample"],
                     "ms_saved_per_frame": 1000 * (1 / fps["grid_sample"] - 1 / fps["auto"])})
    saved = rows[0]["ms_saved_per_frame"] / 1000  # qe's stage 1 at 854x480
    with tempfile.TemporaryDirectory() as cache:  # a fresh inductor cache: the first run on a machine
        first = {s: bench("qe", "none", "854x480", s, 8, 0, TORCHINDUCTOR_CACHE_DIR=cache)["seconds"]
                 for s in ("grid_sample", "auto")}
        cached = bench("qe", "none", "854x480", "auto", 8, 0, TORCHINDUCTOR_CACHE_DIR=cache)["seconds"]
    cold = first["auto"] - first["grid_sample"] + 8 * saved  # the 8 compiled frames were faster too
    warm = cached - first["grid_sample"] + 8 * saved
    _save("long_video", {"rows": rows, "compile_s_first": cold, "compile_s_cached": warm,
                         "break_even_frames_854x480_first": cold / saved,
                         "break_even_frames_854x480_cached": warm / saved,
                         "threshold_frames_854x480": COMPILED_DCN_FROM / (856 * 480 // 16)})


def memory() -> None:
    rows = []
    for frames in (48, 480):
        rows.append(_subprocess(["--model", "qe", "--stage2", "none", "--size", "854x480", "--frames", str(frames)]))
    for frames in (24, 48):
        rows.append(_subprocess(["--model", "qe", "--stage2", "none", "--size", "854x480", "--frames", str(frames),
                                 "--whole"]))
    s60, s600 = rows[0]["peak_rss_mb"], rows[1]["peak_rss_mb"]
    _save("memory", {"rows": rows, "stream_480_over_48": s600 / s60})


def large_frames() -> None:
    """Peak memory and frames/s of the bundled same-size models on 1920x1080 and 3840x2160 frames, untiled
    (`vrestore bench` does not tile; `restore` tiles frames above 1920x1088 by default), 2 frames, no warm-up:
    the first frame's one-off costs, such as building masks for a new size, count, as they do for a short video.
    ``VRESTORE_BENCH_BEFORE=DIR`` (the ``src`` folder of another checkout, e.g. a ``git worktree`` of an earlier
    commit) runs each case with that code too, right after this tree's, so a change's rows compare on one
    machine and day."""
    rows = [row for size in ("1920x1080", "3840x2160") for model in ("qe-fast", "qe", "qe-hq")
            for row in _memory_rows(model, size, ["--frames", "2"])]
    _save("large_frames", {"frames": 2, "warmup": 0, "rows": rows})


def _memory_rows(model: str, size: str, args: list[str]) -> list[dict]:
    """`vrestore bench --warmup 0` of one case (peak memory, seconds per frame) with this tree and, with
    ``VRESTORE_BENCH_BEFORE=DIR`` (the ``src`` folder of another checkout), right after with that code; a
    child the out-of-memory killer stops is recorded, not fatal."""
    before = os.environ.get("VRESTORE_BENCH_BEFORE")
    codes = [("this tree", {})]
    if before:
        commit = subprocess.run(["git", "-C", before, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        codes.append((f"before ({commit})", {"PYTHONPATH": str(Path(before).resolve())}))
    rows = []
    for code, env in codes:
        row = {"model": model, "input": size, "args": " ".join(args), "code": code}
        try:
            r = _subprocess(["--model", model, "--size", size, "--warmup", "0", *args], env=env)
            row |= {"peak_rss_mb": r["peak_rss_mb"], "sec_per_frame": r["seconds"] / r["frames"], "failed": ""}
        except subprocess.CalledProcessError as e:  # the out-of-memory killer's SIGKILL is -9
            row |= {"peak_rss_mb": None, "sec_per_frame": None, "failed": f"exit {e.returncode}"}
        rows.append(row)
    return rows


def window_memory() -> None:
    """Peak memory of full temporal windows at 1920x1080 (`restore`'s default chunk of 32 frames), untiled
    and in 1024 px tiles (``bench --tile``), where a window's frames, not one frame's transients, set the
    peak; ``VRESTORE_BENCH_BEFORE`` as in ``large_frames``."""
    cases = [("qe", ["--frames", "32"]), ("qe", ["--frames", "16"]), ("qe", ["--frames", "32", "--tile", "1024"]),
             ("qe-fast", ["--frames", "8"])]
    _save("window_memory", {"warmup": 0, "rows": [r for m, a in cases for r in _memory_rows(m, "1920x1080", a)]})


def tiled_windows() -> None:
    """Peak memory of full 32-frame windows in 512 px tiles at 1920x1080, the way `restore` runs large frames
    (tiles bound the features; the window's whole-frame buffers remain), for `qe` and for stage 2 alone
    (`qe-fast`); ``VRESTORE_BENCH_BEFORE`` as in ``large_frames``."""
    cases = [("qe", ["--frames", "32", "--tile", "512"]), ("qe-fast", ["--frames", "32", "--tile", "512"])]
    _save("tiled_windows", {"warmup": 0, "rows": [r for m, a in cases for r in _memory_rows(m, "1920x1080", a)]})


def speed() -> None:
    args = ["--model", "basicvsrpp_c64n7_x1", "--stage2", "none", "--size", "960x536", "--frames", "20",
            "--warmup", "4"]  # steady state for both: kernel set-up and first-touch memory are not throughput
    naive = _subprocess([*args, "--whole", "--dtype", "fp32", "--chunk", "1000", "--plain"], malloc="system")
    ours = _subprocess([*args, "--dtype", "auto"])
    _save("speed", {"naive": naive, "ours": ours, "speedup": ours["fps"] / naive["fps"]})


def _at_target_size(model: str, *stage2: str, extra: tuple[str, ...] = (), frames: int = 20) -> dict:
    """`vrestore bench` of one pipeline at 854x480 (the speed target's size), ``frames`` frames after 4 of
    warm-up; several stage 2s are an ensemble; ``extra``: more `bench` options."""
    return _subprocess(["--model", model, *(a for s in stage2 for a in ("--stage2", s)), "--size", "854x480",
                        "--frames", str(frames), "--warmup", "4", *extra])


def _bundled_rows(name: str, frames: int) -> None:
    """Each bundled same-size model as ``restore`` runs it (its own stage 2, `restore`'s default windows),
    and stage 1 alone (the control), one after the other so the rows compare; saved as ``name``."""
    rows = []
    for model, stage2 in (("qe", "auto"), ("qe-fast", "auto"), ("qe-hq", "auto"), ("qe", "none")):
        r = _at_target_size(model, stage2, frames=frames)
        rows.append({"model": model, "stage2": r["stage2_used"], "stage2_members": r["stage2_members"],
                     "fps": r["fps"], "sec_per_frame": 1 / r["fps"], "chunk": r["chunk"], "overlap": r["overlap"],
                     "peak_rss_mb": r["peak_rss_mb"], "precision": r["precision"]})
    _save(name, {"input": "854x480", "frames": frames, "warmup": 4, "rows": rows})


def bundled() -> None:
    """Frames/s of the bundled same-size models at 854x480 (the speed target's size), 20 frames: one window."""
    _bundled_rows("bundled", 20)


def stream() -> None:
    """The same over 96 frames: `restore`'s default windows (32 frames, 8 shared by consecutive windows),
    the steady state of a long video, which pays for the shared frames that `bundled`'s 20 never reach."""
    _bundled_rows("stream", 96)


def _pipelines(name: str, cases: list[tuple[str, tuple[str, ...], int]]) -> None:
    """Time each (model, stage 2s, stage-2 TTA transforms) at 854x480, one after the other so the rows
    compare, and save them as ``name``."""
    rows = []
    for model, stage2, tta in cases:
        r = _at_target_size(model, *stage2, extra=("--stage2-tta", str(tta)))
        rows.append({"model": model, "stage2": " + ".join(stage2), "stage2_tta": tta, "fps": r["fps"],
                     "sec_per_frame": 1 / r["fps"], "precision": r["precision"]})
    _save(name, {"input": "854x480", "frames": 20, "warmup": 4, "rows": rows})


def stage2_depth() -> None:
    """The bundled pipelines against the same stage 1 with each stage 2 grown by a third residual group
    (random weights: the speed is the architecture's)."""
    _pipelines("stage2_depth", [("qe", ("auto",), 1), ("qe-fast", ("auto",), 1),
                                ("qe", ("swinir_t2_g3_color_dn",), 1), ("qe", ("swinir_t_g3_color_dn",), 1)])


def stage2_alone() -> None:
    """The bundled stage 2s alone: `qe-fast`, the 3-group stage 2 (`qe-hq`'s second member) by itself, and
    `qe-hq` (it and `qe`'s stage 2, averaged): what a single larger stage 2 costs against the pair."""
    from vrestore.weights import bundled_paths

    grown = os.path.relpath(bundled_paths("qe-hq:stage2")[1])
    _pipelines("stage2_alone", [("qe-fast", ("auto",), 1), ("none", (grown,), 1), ("qe-hq", ("auto",), 1)])


def quality_modes() -> None:
    """What the held-out clips' slower modes cost: the bundled pipelines, `qe`'s stage 1 followed by both
    bundled stage 2s averaged (a stage-2 ensemble), `qe-fast` with 2 and 8 TTA transforms around stage 2
    alone, and the bundled stage-2 ensemble `qe-hq` alone and with 2."""
    _pipelines("quality_modes", [("qe", ("auto",), 1), ("qe-fast", ("auto",), 1),
                                 ("qe", ("qe:stage2", "qe-fast:stage2"), 1), ("qe-fast", ("auto",), 2),
                                 ("qe-fast", ("auto",), 8), ("qe-hq", ("auto",), 1), ("qe-hq", ("auto",), 2)])


def gpu() -> None:
    """The bundled models on a CUDA GPU (bf16 autocast, as ``restore --device cuda`` runs them):
    steady-state frames/s and peak GPU memory of the default pipeline."""
    from vrestore.infer.bench import bench
    from vrestore.infer.restorer import Restorer
    from vrestore.weights import bundled_path

    if not torch.cuda.is_available():
        sys.exit("gpu: no CUDA GPU on this machine")
    rows = []
    for model, with_stage2, (w, h) in (("qe", True, (854, 480)), ("qe-fast", True, (854, 480)),
                                       ("qe", False, (854, 480)), ("qe", True, (1920, 1080)),
                                       ("x4", False, (480, 270))):
        r = Restorer(bundled_path(model), bundled_path(f"{model}:stage2") if with_stage2 else None, device="cuda")
        torch.cuda.reset_peak_memory_stats()
        res = bench(r, w, h, 64, warmup=8)
        rows.append({"model": model, "stage2": with_stage2, "input": f"{w}x{h}", "frames": res["frames"],
                     "seconds": res["seconds"], "fps": res["fps"], "precision": res["precision"],
                     "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20})
    _save("gpu", {"rows": rows, "gpu": torch.cuda.get_device_name()})


def onnx() -> None:
    """Per stage at 960x536: the same network through torch fp32, torch bf16
    (autocast, channels_last) and onnxruntime (CPU, fp32) on exported graphs."""
    import tempfile

    from vrestore.export.onnx import export_onnx
    from vrestore.infer.onnx_backend import OnnxModel
    from vrestore.infer.restorer import Restorer
    from vrestore.models import build

    frames, (w, h) = 10, (960, 536)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, role in (("basicvsrpp_c64n7_x1", "stage1"), ("swinir_t_color_dn", "stage2"),
                           ("swinir_s_color_dn", "stage2")):
            torch.manual_seed(0)
            m = build(name).eval()
            path = Path(tmp) / f"{name}.onnx"
            t = time.perf_counter()
            export_onnx(m, path, frames=frames)
            export_s = time.perf_counter() - t
            for backend, dtype in (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32")):
                model = OnnxModel(path) if backend == "onnxruntime" else m
                if role == "stage1":
                    r = Restorer(model, device="cpu", dtype=dtype, chunk=frames, overlap=0)
                    clip = torch.rand(frames, 3, h, w)
                    r.run_clip(clip[:2, :, :64, :64])
                    t = time.perf_counter()
                    r.run_clip(clip)
                    fps = frames / (time.perf_counter() - t)
                else:
                    r = Restorer(build("basicvsrpp_c16n2_x1"), model, device="cpu", dtype=dtype)
                    x = torch.rand(1, 3, h, w)
                    with torch.inference_mode():
                        r._stage2(x[:, :, :64, :64])
                        t = time.perf_counter()
                        r._stage2(x)
                        fps = 1 / (time.perf_counter() - t)
                rows.append({"model": name, "stage": role, "backend": backend, "dtype": dtype, "fps": fps,
                             "export_s": export_s})
    base = {(r["model"]): r["fps"] for r in rows if r["backend"] == "torch" and r["dtype"] == "fp32"}
    for r in rows:
        r["vs_torch_fp32"] = r["fps"] / base[r["model"]]
    _save("onnx", {"input": f"{w}x{h}", "stage1_frames": frames, "onnxruntime": __import__("onnxruntime").__version__,
                   "rows": rows})


def load() -> None:
    """20 short real clips restored by two concurrent `vrestore restore` processes
    sharing one output folder, against a single-process run: every output
    checked frame by frame (FFV1, fp32: deterministic); peak RSS of each."""
    import hashlib
    import os
    import tempfile

    import numpy as np

    from vrestore.data.sources import sample_clip
    from vrestore.video.io import VideoReader, VideoWriter

    def run(src: Path, dst: Path, n: int) -> tuple[float, list[int], list[str]]:
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, torch.get_num_threads() // n)))
        cmd = [sys.executable, "-m", "vrestore.cli", "restore", str(src), "-o", str(dst), "--dtype", "fp32",
               "--codec", "ffv1"]
        t = time.perf_counter()
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(n)]
        rss, texts = [], []
        for p in procs:
            text = p.stdout.read()
            _, status, usage = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode:
                raise SystemExit(f"restore failed ({p.returncode}): {text[-500:]}")
            rss.append(usage.ru_maxrss // 1024)
            texts.append(text.strip().splitlines()[-1])
        return time.perf_counter() - t, rss, texts

    def digests(folder: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(np.stack([x.rgb for x in VideoReader(f)]).tobytes()).hexdigest()
                for f in sorted(folder.iterdir())}

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "clips"
        src.mkdir()
        frames = [f.rgb for f in VideoReader(sample_clip("bikes"), max_frames=180)]
        for k in range(20):  # 20 clips of 12 frames, 160x96 crops from different places and times
            y, x, t0 = 40 + 8 * (k % 5), 60 + 24 * (k // 5), 8 * k
            with VideoWriter(src / f"clip{k:02d}.mkv", codec="ffv1", fps=25) as w:
                for f in frames[t0: t0 + 12]:
                    w.write(np.ascontiguousarray(f[y: y + 96, x: x + 160]))
        t1, rss1, _ = run(src, Path(tmp) / "single", 1)
        t2, rss2, texts = run(src, Path(tmp) / "shared", 2)
        ref, got = digests(Path(tmp) / "single"), digests(Path(tmp) / "shared")
    leftovers = [n for n in got if n.startswith(".")]
    _save("load", {"clips": 20, "frames_per_clip": 12, "size": "160x96", "model": "qe (bundled)",
                   "all_outputs_present": sorted(ref) == sorted(n for n in got if not n.startswith(".")),
                   "all_outputs_identical_to_single_process": ref == got, "leftover_files": leftovers,
                   "rows": [{"processes": 1, "wall_s": t1, "peak_rss_mb_each": str(rss1)},
                            {"processes": 2, "wall_s": t2, "peak_rss_mb_each": str(rss2)}],
                   "summaries_of_the_two_processes": texts})


def train() -> None:
    """Iterations/s of the small CPU QE recipe's first step (the real engine:
    data sampling, forward, loss, backward, clipping, Adam, EMA) on a real clip
    prepared with the LDV protocol. The baseline is plain fp32 eager on glibc's
    default heap in the default layout; against it, what `vrestore train` does
    here (bf16 autocast, the kept heap, a channels-last model), the same without
    channels-last or in fp32, and with the recipe's ``compile: true`` (the
    first iterations, which compile, are not timed). One child process per row."""
    import tempfile

    from vrestore.data.sources import sample_clip
    from vrestore.video.degrade import prepare_dataset
    from vrestore.video.io import VideoReader, VideoWriter

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        clean.mkdir()
        with VideoWriter(clean / "bikes.mkv", codec="ffv1", fps=25) as w:
            for f in VideoReader(sample_clip("bikes"), max_frames=40):
                w.write(f.rgb)
        prepare_dataset(clean, Path(tmp) / "qe", task="qe")
        for stage, settings in (("stage1", (("fp32", "system", "0", "0"), ("fp32", "kept", "1", "0"),
                                            ("bf16", "kept", "0", "0"), ("bf16", "kept", "1", "0"),
                                            ("bf16", "kept", "1", "1"))),
                                ("stage2", (("fp32", "system", "0", "0"), ("bf16", "kept", "1", "0"),
                                            ("bf16", "kept", "1", "1")))):
            first = len(rows)
            for dtype, malloc, cl, comp in settings:
                rows.append({"stage": stage} | _child([__file__, "_train_row", tmp, dtype, cl, comp, stage], malloc))
            for r in rows[first:]:  # against the plain fp32 eager row of the same recipe
                r["speedup"] = r["it_per_s"] / rows[first]["it_per_s"]
    from omegaconf import OmegaConf

    loaded = {k: OmegaConf.load(v) for k, v in TRAIN_RECIPES.items()}
    recipes = {k: f"{v.relative_to(HERE.parent)} (first step, {loaded[k].data.batch} per batch)"
               for k, v in TRAIN_RECIPES.items()}
    data = loaded["stage1"].data
    _save("train", {"recipes": recipes, "stage1_clip_len": data.clip_len, "stage1_patch": data.patch,
                    "iterations_timed": TRAIN_ITERS - TRAIN_SKIP, "amx": bool(torch.cpu._is_amx_tile_supported()),
                    "rows": rows})


TRAIN_ITERS, TRAIN_SKIP = 10, 2
TRAIN_RECIPES = {"stage1": HERE.parent / "configs" / "qe_basicvsrpp_c32n4_pqf_cpu.yaml",
                 "stage2": HERE.parent / "configs" / "qe_swinir_t_stage2_cpu_identity.yaml"}


def _train_row(tmp: str, dtype: str, channels_last: str, compile: str, stage: str) -> None:
    import numpy as np
    from omegaconf import OmegaConf

    from vrestore.infer.device import keep_freed_memory
    from vrestore.train.engine import Trainer
    from vrestore.train.plot import read_log

    kept = keep_freed_memory()
    base = OmegaConf.load(TRAIN_RECIPES[stage])
    cl, comp = channels_last == "1", compile == "1"
    run = f"{tmp}/run_{stage}_{dtype}_{'kept' if kept else 'system'}_{channels_last}{compile}"
    cfg = OmegaConf.merge(base, {"out": run, "dtype": dtype, "device": "cpu", "channels_last": cl, "compile": comp,
                                 "data": {"train": f"{tmp}/qe"}, "val": {"every": 0, "at_start": False},
                                 "checkpoint_every": 10 ** 6})
    cfg.steps = [dict(base.steps[0]) | {"name": "bench", "iters": TRAIN_ITERS}]
    tr = Trainer(cfg)
    tr.run()
    secs = [r["sec"] for r in read_log(Path(run)) if "sec" in r]
    print(json.dumps({"dtype": dtype, "heap": "kept" if kept else "system", "channels_last": cl, "compile": comp,
                      "it_per_s": 1 / float(np.mean(secs[TRAIN_SKIP:])),
                      "sec_per_it": float(np.mean(secs[TRAIN_SKIP:])), "first_iters_s": float(sum(secs[:TRAIN_SKIP]))}))


def train_convs() -> None:
    """Why the small stage-1 recipe trains only about 1.5x faster with bf16: a 3x3
    conv's forward and backward at the shape its recurrent blocks run frame by
    frame (8 windows x 32 channels x 16x16 features: 64 px patches at 1/4 size)
    against the same conv on 5 frames at once and on a 256 px patch's features.
    The speed-up over fp32 grows with the work per call (kept heap)."""
    rows = []
    for label, shape in (("per frame, 64 px patches (the recipe)", (8, 32, 16, 16)),
                         ("5 frames at once", (40, 32, 16, 16)), ("per frame, 256 px patches", (8, 32, 64, 64))):
        row = {"features": label, "shape": "x".join(map(str, shape))}
        for key, dtype, cl in (("fp32_ms", "fp32", False), ("fp32_cl_ms", "fp32", True), ("bf16_cl_ms", "bf16", True)):
            conv = torch.nn.Conv2d(shape[1], shape[1], 3, padding=1)
            x = torch.randn(*shape)
            if cl:
                conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
            x.requires_grad_()

            def step(conv=conv, x=x, dtype=dtype) -> None:
                with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
                    y = conv(x)
                y.float().sum().backward()

            row[key] = _timeit(step, repeat=30, warmup=5) * 1e3
        rows.append(row | {"bf16_speedup": row["fp32_ms"] / row["bf16_cl_ms"]})
    _save("train_convs", {"what": "3x3 conv, 32 -> 32 channels, forward + backward, minimum of 30",
                          "amx": bool(torch.cpu._is_amx_tile_supported()), "rows": rows})


def report() -> None:
    lines = ["# Benchmark results", "", "Generated by `python benchmarks/run.py report` from `results/*.json`.", ""]
    for f in sorted(RESULTS.glob("*.json")):
        d = json.loads(f.read_text())
        env = d.get("env", {})
        lines += [f"## {f.stem}", "", f"`python benchmarks/run.py {f.stem}` on {env.get('cpu')}, "
                  f"{env.get('threads')} threads, torch {env.get('torch')}, {env.get('date')}", ""]
        rows = d.get("rows")
        if rows:
            keys = [k for k in rows[0] if not isinstance(rows[0][k], dict)]
            keys = [k for k in keys if k not in ("torch", "machine", "threads")]
            lines.append("| " + " | ".join(keys) + " |")
            lines.append("|" + "---|" * len(keys))
            for r in rows:
                lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k])
                                               for k in keys) + " |")
            lines.append("")
        for k, v in d.items():
            if k not in ("rows", "env") and not isinstance(v, (list,)):
                lines.append(f"- {k}: {json.dumps(v) if isinstance(v, dict) else v}")
        lines.append("")
    (HERE / "RESULTS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "report"
    children = {"_dcn_rows": _dcn_rows, "_train_row": _train_row}  # the child processes of dcn() and train()
    if what in children:
        sys.exit(children[what](*sys.argv[2:]))
    from vrestore.infer.device import keep_freed_memory

    keep_freed_memory()
    fns = {"dcn": dcn, "stage1": stage1, "stage2": stage2, "attention": attention, "memory": memory, "speed": speed,
           "bundled": bundled, "stream": stream, "long_video": long_video, "stage2_depth": stage2_depth,
           "quality_modes": quality_modes, "stage2_alone": stage2_alone, "large_frames": large_frames,
           "window_memory": window_memory, "tiled_windows": tiled_windows,
           "swin1080": swin1080, "chunks": chunks, "onnx": onnx,
           "gpu": gpu, "load": load, "train": train, "train_convs": train_convs, "report": report}
    everything = [n for n in list(fns)[:-1] if n != "gpu" or torch.cuda.is_available()]
    for name in (everything if what == "all" else [what]):
        fns[name]()
    report()
