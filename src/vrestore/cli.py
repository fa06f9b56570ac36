"""The ``vrestore`` command line (Typer + Rich).

User errors (:class:`VrestoreError`) print one line naming the file and the
problem and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import sys
from fractions import Fraction
from pathlib import Path

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

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Restore compressed video (BasicVSR++ + SwinIR, the NTIRE 2022 recipe).")
console = Console(stderr=True)
out = Console()


def handled(fn):
    """Turn user errors into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VrestoreError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]; partial outputs were removed")
            raise typer.Exit(130) from None

    return wrapper


def progress_bar() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console)


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
            overwrite: bool = typer.Option(False, help="Redo pairs that already exist.")) -> None:
    """Build a paired data set (lossless GT, LDV-compressed LQ, PQF lists, meta.json)."""
    from .video.degrade import prepare_dataset

    with progress_bar() as pb:
        tasks: dict[str, int] = {}

        def cb(name: str, i: int, n: int | None) -> None:
            if name not in tasks:
                tasks[name] = pb.add_task(name, total=n, rate="")
            pb.update(tasks[name], completed=i, total=n)

        meta = prepare_dataset(src, output, task=task, qp=qp, max_frames=max_frames, overwrite=overwrite,
                               progress=cb)
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


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
