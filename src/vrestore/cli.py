"""The ``vrestore`` command line (Typer + Rich).

User errors (:class:`VrestoreError`) print one line naming the file and the
problem and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import sys
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .errors import VrestoreError
from .weights import bundled_models

if TYPE_CHECKING:  # the CLI imports torch only when a command needs it
    from .infer.restorer import ModelSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Restore compressed video (BasicVSR++ + SwinIR, the NTIRE 2022 recipe).")
console = Console(stderr=True)
_BUNDLED = ", ".join(bundled_models())  # for help texts: the names models.json registers, as `vrestore models` lists
out = Console()


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every partial output is cleaned up."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def handled(fn):
    """Turn user errors into a one-line message and exit status 2; Ctrl-C and
    SIGTERM unwind normally (partial outputs removed) and exit 130 / 143."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VrestoreError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            console.print(f"[yellow]{what}[/]; partial outputs were removed")
            raise typer.Exit(143 if isinstance(e, Terminated) else 130) from None

    return wrapper


def progress_bar(to: Console | None = None) -> Progress:
    """The bar of every long command. Its ``rate`` column needs ``rate=""`` in each ``add_task``."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=to or console)


def _refuse_existing(output: Path, overwrite: bool) -> None:
    """A single output file (a checkpoint, an ONNX graph) is never replaced by accident."""
    if output.exists() and not overwrite:
        raise VrestoreError(f"{output}: exists (use --overwrite to replace it)")


def _raw_spec(size: str | None, pix_fmt: str, fps: float):
    from .video.io import RawSpec

    if size is None:
        return None
    try:
        w, h = (int(x) for x in size.lower().split("x"))
    except ValueError:
        raise VrestoreError(f"--size must look like 1920x1080, got {size!r}") from None
    return RawSpec(w, h, pix_fmt, Fraction(fps).limit_denominator(1001))


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    logging.getLogger("libav").setLevel(logging.ERROR)
    from .infer.device import keep_freed_memory

    logging.getLogger(__name__).debug("large tensors on a kept heap: %s", keep_freed_memory())


@app.command()
@handled
def degrade(src: Path = typer.Argument(..., help="Clean input video."),
            output: Path = typer.Option(..., "-o", "--output", help="Compressed output (.mp4/.mkv)."),
            qp: int = typer.Option(37, help="Base QP (LDV 2.0 uses 37)."),
            scale: int = typer.Option(1, help="1 (QE), 2 or 4 (bicubic downscale first)."),
            gt: Path = typer.Option(None, help="Also write the cropped clean GT losslessly (FFV1 .mkv)."),
            max_frames: int = typer.Option(None, help="Only the first N frames."),
            overwrite: bool = typer.Option(False, help="Replace existing outputs.")) -> None:
    """Compress a clean video with the LDV 2.0 protocol (x265 low-delay P, PQF every 4th frame)."""
    from .video.degrade import degrade_video

    with progress_bar() as pb:
        task = pb.add_task(f"degrade {src.name}", total=None, rate="")
        rep = degrade_video(src, output, qp=qp, scale=scale, gt_dst=gt, max_frames=max_frames,
                            overwrite=overwrite, progress=lambda i, n: pb.update(task, completed=i, total=n))
    out.print(f"wrote {rep.output}: {rep.num_frames} frames {rep.width}x{rep.height}, QP {qp} "
              f"(PQF QP {min(rep.frame_qps[1:] or [qp])}, others up to {max(rep.frame_qps)}), "
              f"PQFs every 4th frame from 0", highlight=False)


@app.command()
@handled
def prepare(src: Path = typer.Argument(..., help="A clean video or a folder of them."),
            output: Path = typer.Option(..., "-o", "--output", help="Data-set folder to create/extend."),
            task: str = typer.Option("qe", help="qe, x2 or x4."),
            qp: int = typer.Option(37),
            max_frames: int = typer.Option(None, help="Only the first N frames of each video."),
            overwrite: bool = typer.Option(False, help="Redo pairs that already exist."),
            jobs: int = typer.Option(1, min=1, help="Videos degraded at once (worker processes).")) -> None:
    """Build a paired data set (lossless GT, LDV-compressed LQ, PQF lists, meta.json)."""
    from .video.degrade import prepare_dataset

    with progress_bar() as pb:
        tasks: dict[str, int] = {}

        def cb(name: str, i: int, n: int | None) -> None:
            if name not in tasks:
                tasks[name] = pb.add_task(name, total=n, rate="")
            pb.update(tasks[name], completed=i, total=n)

        meta = prepare_dataset(src, output, task=task, qp=qp, max_frames=max_frames, overwrite=overwrite,
                               progress=cb, jobs=jobs)
    out.print(f"{output}: {len(meta['clips'])} pairs ({task}, QP {qp}); see {output / 'meta.json'}")


def _pairs(ref: Path, dist: Path) -> list[tuple[str, Path, Path]]:
    from .video.degrade import list_videos

    if ref.is_file() and (dist.is_file() or (dist.is_dir() and any(dist.glob("*.png")))):
        return [(dist.stem, ref, dist)]
    if ref.is_dir() and dist.is_dir():
        refs = {p.stem: p for p in list_videos(ref)} or {p.name: p for p in ref.iterdir() if p.is_dir()}
        dists = {p.stem: p for p in list_videos(dist)} or {p.name: p for p in dist.iterdir() if p.is_dir()}
        common = sorted(set(refs) & set(dists))
        if not common:
            raise VrestoreError(f"{dist}: no video names in common with {ref}")
        return [(k, refs[k], dists[k]) for k in common]
    for p in (ref, dist):
        if not p.exists():
            raise VrestoreError(f"{p}: no such file or directory")
    raise VrestoreError(f"--ref {ref} and --dist {dist} must both be files or both be folders")


def _uint8_frames(path: Path):
    from .video.io import VideoReader

    for f in VideoReader(path):
        yield f.rgb if f.rgb.dtype.name == "uint8" else (f.rgb >> 8).astype("uint8")


@app.command("eval")
@handled
def eval_cmd(ref: Path = typer.Option(..., "--ref", help="Ground truth video or folder."),
             dist: Path = typer.Option(..., "--dist", help="Restored/compressed video or folder."),
             every: int = typer.Option(1, help="Score every Nth frame (the NTIRE server used 10)."),
             all_frames: bool = typer.Option(False, help="Keep frames with MSE 0 (NTIRE skips them)."),
             no_ssim: bool = typer.Option(False, help="PSNR only (faster)."),
             json_out: Path = typer.Option(None, "--json", help="Write per-video and per-frame scores."),
             csv_out: Path = typer.Option(None, "--csv", help="Write the per-video table."),
             plot: Path = typer.Option(None, help="PNG plot of per-frame RGB-PSNR.")) -> None:
    """PSNR/SSIM (RGB and Y) per video and averaged, with the NTIRE protocol by default."""
    from . import metrics

    scores = []
    for name, r, d in _pairs(ref, dist):
        try:
            scores.append(metrics.score_video(_uint8_frames(r), _uint8_frames(d), name, ntire=not all_frames,
                                              every=every, with_ssim=not no_ssim))
        except ValueError as e:
            raise VrestoreError(f"{d}: {e}") from None
    table = Table("video", "frames", "PSNR RGB", "PSNR Y", "SSIM RGB", "SSIM Y")
    for s in scores:
        m = s.summary()
        table.add_row(s.name, str(m["frames"]), f"{m['psnr_rgb']:.3f}", f"{m['psnr_y']:.3f}",
                      f"{m['ssim_rgb']:.4f}", f"{m['ssim_y']:.4f}")
    avg = metrics.average(scores)
    table.add_row("[bold]average", "", f"{avg['psnr_rgb']:.3f}", f"{avg['psnr_y']:.3f}",
                  f"{avg['ssim_rgb']:.4f}", f"{avg['ssim_y']:.4f}")
    out.print(table)
    if json_out:
        json_out.write_text(json.dumps({"average": avg, "videos": [s.summary() | {"per_frame": {
            "index": s.frames, "psnr_rgb": s.psnr_rgb, "psnr_y": s.psnr_y}} for s in scores]}, indent=1))
    if csv_out:
        with open(csv_out, "w", newline="") as fh:
            w = csv.DictWriter(fh, ["name", "frames", "skipped", "psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y"])
            w.writeheader()
            for s in scores:
                w.writerow(s.summary())
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 3.5))
        for s in scores:
            ax.plot(s.frames, s.psnr_rgb, marker=".", label=s.name)
        ax.set_xlabel("frame")
        ax.set_ylabel("RGB PSNR (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)


@app.command()
@handled
def info(path: Path = typer.Argument(...),
         size: str = typer.Option(None, help="For raw .yuv: WIDTHxHEIGHT."),
         pix_fmt: str = typer.Option("yuv420p", help="For raw .yuv."),
         fps: float = typer.Option(25.0, help="For raw .yuv."),
         json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Streams, size, fps, frame count, colour tags and a PQF guess."""
    from .video.degrade import detect_pqfs
    from .video.io import packet_sizes, probe

    meta = probe(path, _raw_spec(size, pix_fmt, fps)).as_dict()
    if meta["kind"] == "container":
        sizes = packet_sizes(path)
        meta["num_frames"] = len(sizes)
        pqfs = detect_pqfs(sizes)
        meta["pqf_guess"] = None if pqfs is None else {"period": 4, "phase": pqfs[1] % 4 if len(pqfs) > 1 else 0,
                                                       "first": pqfs[:6]}
    if json_out:
        out.print_json(json.dumps(meta))
        return
    for k, v in meta.items():
        out.print(f"[bold]{k}[/]: {v}", highlight=False)


@app.command()
@handled
def train(recipe: Path = typer.Argument(..., help="Recipe YAML (configs/...)."),
          overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. optim.lr=1e-4"),
          resume: bool = typer.Option(False, help="Continue from the run's last checkpoint."),
          device: str = typer.Option("auto"), dtype: str = typer.Option("auto")) -> None:
    """Train a recipe end to end (all its steps); resumable with --resume."""
    from .train.engine import Trainer, load_recipe

    cfg = load_recipe(recipe, overrides)
    trainer = Trainer(cfg, resume=resume, device=device, dtype=dtype)
    try:
        if trainer.rank != 0:  # under torchrun, rank 0 alone reports
            trainer.run()
            return
        procs = f" x {trainer.world} processes" if trainer.world > 1 else ""
        console.print(f"training {cfg.name} on {trainer.precision}{procs} -> {trainer.out}")
        with progress_bar() as pb:
            final = trainer.run(pb)
        best = trainer.state['best_psnr']
        out.print(f"done: {final}" + (f" (best validation PSNR {best:.3f} dB)" if best > 0 else ""))
    finally:
        trainer.close()


@app.command("plot-log")
@handled
def plot_log(run: Path = typer.Argument(..., help="Run folder (runs/NAME) or its metrics.jsonl."),
             output: Path = typer.Option(None, "-o", "--output", help="PNG (default: RUN/curves.png)."),
             smooth: int = typer.Option(25, help="Moving-average window for the loss.")) -> None:
    """Draw a training run's loss and validation-PSNR curves to a PNG."""
    from .train.plot import plot_log as draw

    if output is None:
        output = (run if run.is_dir() else run.parent) / "curves.png"
    summary = draw(run, output, smooth=max(1, smooth))
    val = summary.get("val_psnr_first_last_best")
    extra = f", val PSNR {val[0]:.2f} -> {val[1]:.2f} dB (best {val[2]:.2f} at {summary['best_iter']})" if val else ""
    out.print(f"wrote {output}: {summary['records']} records to iteration {summary['last_iter']}{extra}",
              highlight=False, soft_wrap=True)


def _parse_pqfs(pqf: str) -> list[int] | str | None:
    if pqf == "auto":
        return "auto"
    if pqf == "none":
        return None
    try:
        return sorted({int(x) for x in pqf.split(",") if x.strip()})
    except ValueError:
        raise VrestoreError(f"--pqf must be auto, none or comma-separated frame indices, got {pqf!r}") from None


def make_restorer(model: ModelSpec, stage2: ModelSpec | list[ModelSpec] | None, ensemble: list[str] | None, *,
                  tta: bool, dedup: bool, device: str, dtype: str, chunk: int, overlap: int, tile: int | None,
                  backend: str = "auto", compile: bool = False, channels_last: bool | None = None,
                  stage2_tta: int = 1):
    """Resolve model names/paths (a bundled name brings its own stage 2) or modules into a Restorer; several
    stage-2 checkpoints are an ensemble (their outputs averaged), 'none' skips stage 2."""
    from .infer.restorer import Restorer
    from .weights import bundled_path, bundled_paths

    first = [] if model is None or model in ("none", "") else [model]
    second = list(stage2) if isinstance(stage2, (list, tuple)) else [] if stage2 is None else [stage2]

    def files(spec: ModelSpec) -> list[ModelSpec]:
        """A bundled stage-2 name (``qe:stage2``) stands for its files: several for a bundled ensemble."""
        found = bundled_paths(spec) if isinstance(spec, str) and ":" in spec and not Path(spec).exists() else []
        return [str(f) for f in found] or [spec]

    second = [f for s in second for f in files(s)]
    if isinstance(model, str) and model in bundled_models():
        own = bundled_path(model)  # None: a bundled model that runs stage 2 alone (qe-fast)
        first = [str(own)] if own else []
        if not second:
            second = [str(p) for p in bundled_paths(f"{model}:stage2")]
    if any(s in ("none", "") for s in second):
        if len(second) > 1:
            raise VrestoreError("--stage2 none skips stage 2: it cannot be given with other stage-2 checkpoints")
        second = []
    if ensemble and not first:
        raise VrestoreError("--ensemble averages stage-1 models with --model's: this model has no stage 1")
    if not first and not second:
        raise VrestoreError(f"{model}: no stage 1 and no stage 2 left to run (--model none needs --stage2)")
    return Restorer(first + list(ensemble or []), second or None, tta=tta, device=device, dtype=dtype, chunk=chunk,
                    overlap=overlap, tile=tile, dedup=dedup, backend=backend, compile=compile,
                    channels_last=channels_last, stage2_tta=stage2_tta)


_EXT = {"x264": ".mp4", "x265": ".mp4", "ffv1": ".mkv", "png": ""}


def _warn_damage(src: Path, rep) -> None:
    """Say what a damaged input cost: its output holds the frames that decoded."""
    bad, cut = rep.extra.get("corrupt_packets", 0), rep.extra.get("truncated", False)
    if bad or cut:
        what = [f"{bad} corrupt packet(s) skipped"] if bad else []
        what += ["the file ends early (truncated)"] if cut else []
        console.print(f"[yellow]warning:[/] {src}: {', '.join(what)}; the output holds the {rep.frames} frames "
                      "that decoded, at their own timestamps", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def claim(dst: Path):
    """Yield True if this process holds ``dst`` (an exclusive ``.lock`` file
    beside it, removed afterwards), False if a live process on this machine
    holds it. Locks of dead processes are taken over."""
    import os
    import socket

    lock = dst.with_name(f".{dst.name}.lock")
    me = f"{socket.gethostname()} {os.getpid()}"
    # The lock appears with its owner already written (hard link of a finished
    # file): an O_EXCL create then write let a second process read it empty,
    # take it for stale and restore the same video too.
    mine = lock.with_name(f"{lock.name}.{os.getpid()}")
    mine.write_text(me)
    try:
        for _ in range(2):
            try:
                os.link(mine, lock)
            except FileExistsError:
                if _owner_alive(lock):
                    yield False
                    return
                lock.unlink(missing_ok=True)
                continue
            try:
                yield True
            finally:
                lock.unlink(missing_ok=True)
            return
        yield False
    finally:
        mine.unlink(missing_ok=True)


def _owner_alive(lock: Path) -> bool:
    """Whether the process named in ``lock`` ("host pid") may still run it; an
    unreadable or corrupt lock counts as stale."""
    import socket

    try:
        host, pid = lock.read_text().split()
        return host != socket.gethostname() or _pid_alive(int(pid))
    except (OSError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@app.command()
@handled
def restore(src: Path = typer.Argument(..., help="Input video, raw .yuv, PNG folder, or a folder of videos."),
            output: Path = typer.Option(..., "-o", "--output", help="Output file (or folder for a folder input)."),
            model: str = typer.Option("qe", help=f"Bundled model name ({_BUNDLED}: `vrestore models`), a "
                                                 "checkpoint path, or none (stage 2 alone, from --stage2)."),
            stage2: list[str] = typer.Option(None, help="Stage-2 checkpoint; repeat it to average several (an "
                                             "ensemble); 'none' to skip (bundled models bring one)."),
            ensemble: list[str] = typer.Option(None, help="More stage-1 checkpoints to average with --model."),
            tta: bool = typer.Option(False, help="x8 test-time augmentation (8x slower)."),
            stage2_tta: int = typer.Option(1, "--stage2-tta", help="1, 2, 4 or 8 test-time transforms around "
                                           "stage 2 only (stage 1 runs once); 2 gave half of --tta's gain on the "
                                           "held-out clips (docs/models.md)."),
            dedup: bool = typer.Option(False, help="Restore repeated frames once and copy the output back."),
            pqf: str = typer.Option("auto", help="auto (from packet sizes), none, or e.g. 0,4,8,12."),
            device: str = typer.Option("auto"), dtype: str = typer.Option("auto"),
            codec: str = typer.Option(None, help="x264, x265, ffv1 or png (default from the extension)."),
            quality: int = typer.Option(None, help="CRF for x264/x265."),
            chunk: int = typer.Option(32, help="Frames per temporal window."),
            overlap: int = typer.Option(8, help="Frames shared by consecutive windows."),
            tile: int | None = typer.Option(None, help="Split frames into tiles of this many input pixels, for both "
                                          "stages, to bound memory (0 = off; default: 1024 for same-size frames "
                                          "above 1920x1088, 256 for x4 inputs above 480x272, none below)."),
            backend: str = typer.Option("auto", help="torch, onnxruntime (exports checkpoints on first use, "
                                        "cached), or auto (onnxruntime for .onnx models)."),
            size: str = typer.Option(None, help="For raw .yuv: WIDTHxHEIGHT."),
            pix_fmt: str = typer.Option("yuv420p", help="For raw .yuv."),
            fps: float = typer.Option(25.0, help="For raw .yuv."),
            overwrite: bool = typer.Option(False, help="Replace existing outputs."),
            compile: bool = typer.Option(False, "--compile", help="torch.compile stage 2 and, on CPUs, stage 1's "
                                         "deformable-convolution sampling: faster per frame after a one-off "
                                         "compilation per frame size (needs a C++ compiler on CPUs).")
            ) -> None:
    """Restore a video (or a folder of videos) in one streaming pass."""
    import os

    from .video.degrade import list_videos

    if not src.exists():
        raise VrestoreError(f"{src}: no such file or directory")
    restorer = make_restorer(model, stage2, ensemble, tta=tta, dedup=dedup, device=device, dtype=dtype,
                             chunk=chunk, overlap=overlap, tile=tile, backend=backend, compile=compile,
                             stage2_tta=stage2_tta)
    pqfs = _parse_pqfs(pqf)
    raw = _raw_spec(size, pix_fmt, fps)
    is_batch = src.is_dir() and not any(src.glob("*.png"))
    if not is_batch:
        with progress_bar() as pb:
            task = pb.add_task(src.name, total=None, rate="")

            def tick(i: int, n: int | None) -> None:
                elapsed = pb.tasks[task].elapsed or 1e-9
                pb.update(task, completed=i, total=n, rate=f"{i / elapsed:.2f} fps")

            rep = restorer.restore_video(src, output, codec=codec, quality=quality, pqfs=pqfs, overwrite=overwrite,
                                         raw=raw, progress=tick)
        compiled = ", deformable sampling compiled (long video)" if rep.extra["dcn_sampler"] == "auto" else ""
        tiles = f", tiles of {rep.extra['tile']} px" if rep.extra["tile"] else ""
        out.print(f"wrote {rep.output}: {rep.frames} frames in {rep.seconds:.1f} s ({rep.fps:.2f} fps, "
                  f"{rep.extra['precision']}{compiled}{tiles})", highlight=False)
        _warn_damage(src, rep)
        return
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    videos = list_videos(src)[rank::world]  # under torchrun each rank takes its share
    output.mkdir(parents=True, exist_ok=True)
    ext = _EXT[codec or "x264"]
    failures: list[tuple[Path, str]] = []
    done = skipped = elsewhere = 0
    with progress_bar() as pb:
        overall = pb.add_task("videos", total=len(videos), rate="")
        for v in videos:
            dst = output / (v.stem + ext)
            if dst.exists() and not overwrite:
                skipped += 1
                pb.advance(overall)
                continue
            with claim(dst) as mine:  # another process on this folder may have it
                if not mine:
                    elsewhere += 1
                elif dst.exists() and not overwrite:  # finished by another process meanwhile
                    skipped += 1
                else:
                    task = pb.add_task(v.name, total=None, rate="")
                    try:
                        rep = restorer.restore_video(
                            v, dst, codec=codec or "x264", quality=quality, pqfs=pqfs, overwrite=overwrite,
                            progress=lambda i, n, _t=task: pb.update(_t, completed=i, total=n))
                        done += 1
                        _warn_damage(v, rep)
                    except VrestoreError as e:
                        failures.append((v, str(e)))
                    except Exception as e:  # noqa: BLE001 - one bad video must not stop the batch
                        failures.append((v, f"{type(e).__name__}: {e}"))
                    pb.remove_task(task)
            pb.advance(overall)
    busy = f", {elsewhere} in progress in another process" if elsewhere else ""
    out.print(f"{done} restored, {skipped} already done{busy}, {len(failures)} failed")
    for v, msg in failures:
        console.print(f"[red]failed[/] {v}: {msg}", highlight=False, soft_wrap=True)  # one greppable line each
    if failures:
        raise typer.Exit(1)


@app.command()
@handled
def convert(src: Path = typer.Argument(..., help="Published checkpoint (.pth) or a vrestore .safetensors file."),
            output: Path = typer.Option(..., "-o", "--output", help="vrestore .safetensors file."),
            half: bool = typer.Option(False, "--half", help="Store the weights as float16 (half the size, as bundled "
                                      "models are; loading casts them back to the model's float32)."),
            overwrite: bool = typer.Option(False, help="Replace an existing output.")) -> None:
    """Write a published BasicVSR++/SwinIR checkpoint (or a vrestore one) as a vrestore safetensors file."""
    from .models import load, save

    if output.resolve() == src.resolve():
        raise VrestoreError(f"{output}: the output would replace its own source; choose another path")
    _refuse_existing(output, overwrite)
    m = load(src)
    own = ("vrestore_arch", "vrestore_config", "format")  # save() writes these from the model
    meta = {k: v for k, v in getattr(m, "vrestore_meta", {}).items() if k not in own}
    meta["converted_from"] = src.name
    if half:
        m = m.half()
        meta["stored_dtype"] = "float16"
    save(m, output, meta)
    out.print(f"wrote {output}: {m.arch_name} {m.config()}{' (float16)' if half else ''}", highlight=False)


@app.command()
@handled
def export(model: str = typer.Argument(..., help="Bundled name (qe, qe:stage2, ...) or checkpoint path."),
           output: Path = typer.Option(..., "-o", "--output", help="Output .onnx file."),
           fmt: str = typer.Option("onnx", "--format", help="Export format (onnx)."),
           frames: int = typer.Option(32, help="Stage 1: frames per chunk T, fixed in the graph."),
           opset: int = typer.Option(17, help="ONNX opset (>= 16 for GridSample)."),
           overwrite: bool = typer.Option(False, help="Replace an existing output.")) -> None:
    """Export a stage-1 or stage-2 model to ONNX (dynamic height and width),
    checked against the torch model with ONNX Runtime before it is written."""
    from .export.onnx import export_onnx

    if fmt != "onnx":
        raise VrestoreError(f"unknown export format {fmt!r} (supported: onnx)")
    if opset < 16:
        raise VrestoreError(f"opset {opset} lacks GridSample, which deformable convolution needs; use >= 16")
    _refuse_existing(output, overwrite)
    with console.status(f"exporting {model} ..."):
        meta = export_onnx(model, output, frames=frames, opset=opset)
    role = meta["vrestore_role"]
    what = f"T={meta['vrestore_frames']} frames, " if role == "stage1" else ""
    out.print(f"wrote {output}: {role} {meta['vrestore_arch']} ({what}x{meta['vrestore_scale']}, opset {opset}, "
              f"{output.stat().st_size / 1e6:.1f} MB)", highlight=False)


@app.command()
@handled
def models() -> None:
    """List the bundled models (what each runs and what it measured) and the registered architectures/sizes."""
    from .models import list_models
    from .weights import bundled_paths

    entries = bundled_models()
    out.print("bundled models:" + ("" if entries else " (none)"))
    for name, entry in entries.items():
        n = len(bundled_paths(f"{name}:stage2"))
        second = "" if not n else "stage 2" if n == 1 else f"{n} stage 2s averaged"
        if entry.get("stage1"):
            parts = f"stage 1 + {second}" if second else "stage 1 only"
        else:  # stage 2 alone, on the compressed frames
            parts = "stage 2 only" if n == 1 else f"{second}, no stage 1"
        out.print(f"  {name} (x{entry.get('scale', 1)}, {parts}): {entry.get('status', '')}", highlight=False,
                  soft_wrap=True)
    out.print("registered sizes: " + ", ".join(list_models()), soft_wrap=True)


def _comparison_image(lq, restored, gt, path: Path) -> None:
    """compressed | restored | original, with a 3x zoom of the most detailed crop below."""
    import numpy as np
    from matplotlib import image as mpimg

    h, w = gt.shape[:2]
    ch, cw = max(16, h // 6), max(16, w // 6)
    g = gt.astype(np.float32).mean(axis=2)
    best, by, bx = -1.0, 0, 0
    for y in range(0, h - ch + 1, max(1, ch // 2)):
        for x in range(0, w - cw + 1, max(1, cw // 2)):
            v = float(np.abs(np.diff(g[y: y + ch, x: x + cw], axis=1)).mean())
            if v > best:
                best, by, bx = v, y, x
    zoom = 3
    sep = np.full((h, 4, 3), 255, np.uint8)
    top = np.concatenate([lq, sep, restored, sep, gt], axis=1)
    crops = [np.repeat(np.repeat(a[by: by + ch, bx: bx + cw], zoom, 0), zoom, 1) for a in (lq, restored, gt)]
    zsep = np.full((ch * zoom, 4, 3), 255, np.uint8)
    bottom = np.concatenate([crops[0], zsep, crops[1], zsep, crops[2]], axis=1)
    pad = top.shape[1] - bottom.shape[1]
    bottom = np.pad(bottom, ((0, 0), (0, max(0, pad)), (0, 0)), constant_values=255)[:, : top.shape[1]]
    mpimg.imsave(path, np.concatenate([top, np.full((4, top.shape[1], 3), 255, np.uint8), bottom]))


@app.command()
@handled
def demo(output: Path = typer.Option(Path("demo_out"), "-o", "--output", help="Folder for the demo's outputs."),
         model: str = typer.Option("qe", help=f"Bundled model to show ({_BUNDLED})."),
         device: str = typer.Option("auto"), dtype: str = typer.Option("auto"),
         backend: str = typer.Option("auto", help="torch or onnxruntime (exports the model on first use).")) -> None:
    """Degrade the bundled Big Buck Bunny clip with the LDV protocol, restore it, and report the gain."""
    import time as _time

    import numpy as np

    from . import metrics
    from .video.degrade import bicubic_upscale, degrade_video
    from .video.io import VideoReader, VideoWriter

    sample = Path(__file__).parent / "assets" / "bbb_demo.mp4"
    output.mkdir(parents=True, exist_ok=True)
    t0 = _time.perf_counter()
    entry = bundled_models().get(model)
    scale = int(entry.get("scale", 1)) if entry else 1
    comp, orig = output / "compressed.mp4", output / "original.mkv"
    rep = degrade_video(sample, comp, qp=37, scale=scale, gt_dst=orig, overwrite=True)
    gt = np.stack([f.rgb for f in VideoReader(orig)])
    lq = np.stack([f.rgb for f in VideoReader(comp)])
    lq_view = bicubic_upscale(lq, scale) if scale > 1 else lq  # compare against bicubic upscaling
    before = metrics.score_video(gt, lq_view, "compressed")
    out.print(f"compressed with the LDV protocol (x265 LDP, QP 37{f', x{scale}' if scale > 1 else ''}): "
              f"{rep.num_frames} frames, RGB-PSNR {before.summary()['psnr_rgb']:.2f} dB, "
              f"SSIM {before.summary()['ssim_rgb']:.4f}", highlight=False)
    if entry is None:
        out.print(f"no bundled model named {model!r} is installed yet, so only the degradation ran. "
                  f"Outputs in {output}/")
        return
    restorer = make_restorer(model, None, None, tta=False, dedup=False, device=device, dtype=dtype, chunk=48,
                             overlap=8, tile=0, backend=backend)
    t1 = _time.perf_counter()
    restored = np.stack(list(restorer.stream(list(lq), rep.pqfs)))
    t_restore = _time.perf_counter() - t1
    with VideoWriter(output / "restored.mp4", fps=25, codec="x264", quality=12, overwrite=True) as w:
        for f in restored:
            w.write(f)
    after = metrics.score_video(gt, restored, "restored")
    b, a = before.summary(), after.summary()
    mid = len(gt) // 2
    _comparison_image(lq_view[mid], restored[mid], gt[mid], output / "comparison.png")
    report = {"model": model, "precision": restorer.engine, "frames": int(len(gt)),
              "size": f"{gt.shape[2]}x{gt.shape[1]}", "compressed": b, "restored": a,
              "gain_psnr_rgb_db": a["psnr_rgb"] - b["psnr_rgb"], "restore_seconds": t_restore,
              "restore_fps": len(gt) / t_restore, "total_seconds": _time.perf_counter() - t0}
    (output / "report.json").write_text(json.dumps(report, indent=1))
    (output / "report.md").write_text(
        f"# vrestore demo\n\nClip: Big Buck Bunny (CC BY 3.0, Blender Foundation), {len(gt)} frames, "
        f"{report['size']}, compressed with x265 low-delay P at QP 37.\n\n"
        f"| | RGB-PSNR (dB) | Y-PSNR (dB) | RGB-SSIM |\n|---|---|---|---|\n"
        f"| compressed{' (bicubic)' if scale > 1 else ''} | {b['psnr_rgb']:.3f} | {b['psnr_y']:.3f} "
        f"| {b['ssim_rgb']:.4f} |\n"
        f"| restored ({model}) | {a['psnr_rgb']:.3f} | {a['psnr_y']:.3f} | {a['ssim_rgb']:.4f} |\n\n"
        f"Restoration: {t_restore:.1f} s ({report['restore_fps']:.2f} frames/s, {restorer.engine}).\n\n"
        f"![comparison](comparison.png)\n\ncompressed | restored | original (bottom: 3x zoom).\n")
    out.print(f"restored with '{model}': RGB-PSNR {a['psnr_rgb']:.2f} dB ({report['gain_psnr_rgb_db']:+.2f} dB), "
              f"SSIM {a['ssim_rgb']:.4f}; {report['restore_fps']:.2f} frames/s on {restorer.engine}",
              highlight=False)
    out.print(f"outputs: {output}/restored.mp4, comparison.png, report.md ({report['total_seconds']:.0f} s in all)")


@app.command()
@handled
def bench(model: str = typer.Option("qe", help="Bundled name, registered size (e.g. basicvsrpp_c64n7_x1), path, "
                                               "or none (stage 2 alone)."),
          stage2: list[str] = typer.Option(None, help="auto (the default: a bundled model's own stage 2, as "
                                           "`restore` runs it), none, or a stage-2 model (name, path); repeat it "
                                           "for an ensemble."),
          size: str = typer.Option("854x480", help="Input WIDTHxHEIGHT."),
          frames: int = typer.Option(30), chunk: int = typer.Option(32), overlap: int = typer.Option(8),
          warmup: int = typer.Option(0, help="Frames restored first and not timed (kernel set-up, first-touch "
                                              "memory), for a steady-state rate."),
          whole: bool = typer.Option(False, help="The straightforward way: whole clip in one tensor."),
          plain: bool = typer.Option(False, help="No channels_last (plain eager layout)."),
          device: str = typer.Option("auto"), dtype: str = typer.Option("auto"),
          compile: bool = typer.Option(False, "--compile", help="torch.compile as `restore --compile` (stage 2, "
                                       "stage 1's DCN sampling); the compilation happens in the warm-up frames."),
          stage2_tta: int = typer.Option(1, "--stage2-tta", help="As `restore --stage2-tta`."),
          tile: int = typer.Option(0, help="Tiles of this many input pixels, as `restore --tile` (0: none; "
                                   "-1: `restore`'s default for this size)."),
          json_out: Path = typer.Option(None, "--json", help="Also write the result here.")) -> None:
    """Frames/s and peak memory of a model on this machine, as JSON."""
    from .infer.bench import bench as run_bench
    from .models import build, list_models

    def resolve(name: str | None):
        if name in (None, "none", "auto", ""):
            return None
        return build(name) if name in list_models() else name

    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise VrestoreError(f"--size must look like 854x480, got {size!r}") from None
    names = [n for n in stage2 or [] if n != "auto"]
    # a bundled name brings its own stage 2 unless --stage2 names one; a registered size (stage 1 or 2) is
    # built with random weights: the same arithmetic, so the same speed
    r = make_restorer(resolve(model), [resolve(n) or "none" for n in names] or None, None, tta=False, dedup=False,
                      device=device, dtype=dtype, chunk=chunk, overlap=min(overlap, chunk // 2),
                      tile=None if tile < 0 else tile, compile=compile, channels_last=False if plain else None,
                      stage2_tta=stage2_tta)
    label = names[0] if len(names) == 1 else names or "auto"
    res = run_bench(r, w, h, frames, whole=whole, warmup=warmup) | {"model": model, "stage2": label, "plain": plain,
                                                                     "stage2_used": r.stage2 is not None,
                                                                     "stage2_members": len(r.stage2s),
                                                                     "stage2_tta": len(r.stage2_transforms),
                                                                     "compiled": r.compiled,
                                                                     "channels_last": r.channels_last}
    text = json.dumps(res, indent=1)
    out.print_json(text)
    if json_out:
        json_out.write_text(text)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)
    app()


if __name__ == "__main__":
    sys.exit(main())
