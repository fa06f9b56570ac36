"""Streaming video I/O with PyAV: frames in, frames out, never a whole video in memory.

Readers yield :class:`Frame` objects (RGB uint8, or uint16 for sources deeper
than 8 bits) with their timestamps. Writers keep the source's time base,
frame rate and colour tags, pass audio and subtitle streams through, and write
to a hidden temporary name that is renamed only once the file is complete.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import VrestoreError
from .colour import ColourInfo, planes_to_rgb, rgb_to_planes

log = logging.getLogger(__name__)

#: Frames larger than this many pixels are refused before any allocation (16K x 16K).
MAX_PIXELS = 16384 * 16384
RAW_EXTS = {".yuv"}
IMAGE_EXTS = {".png"}
RAW_FORMATS = {  # name -> (bits, chroma subsampling x, y, has chroma)
    "yuv420p": (8, 2, 2, True), "yuv422p": (8, 2, 1, True), "yuv444p": (8, 1, 1, True),
    "yuv420p10le": (10, 2, 2, True), "yuv422p10le": (10, 2, 1, True), "yuv444p10le": (10, 1, 1, True),
    "gray": (8, 1, 1, False), "gray10le": (10, 1, 1, False),
}


@dataclass
class Frame:
    """One decoded picture: ``rgb`` is (H, W, 3) uint8 or uint16; ``pts`` is in
    the reader's ``info.time_base``; ``time`` in seconds."""

    rgb: np.ndarray
    index: int
    pts: int | None = None
    time: float | None = None


@dataclass
class RawSpec:
    """What a headerless ``.yuv`` file cannot tell us itself."""

    width: int
    height: int
    pix_fmt: str = "yuv420p"
    fps: Fraction = Fraction(25)
    matrix: str | None = None
    full_range: bool = False


@dataclass
class VideoInfo:
    path: str
    kind: str  # container | raw | frames
    width: int
    height: int
    fps: Fraction
    time_base: Fraction
    num_frames: int | None
    codec: str
    pix_fmt: str
    bit_depth: int
    colour: ColourInfo
    duration: float | None = None
    streams: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["fps"] = str(self.fps)
        d["time_base"] = str(self.time_base)
        return d


def _bad(path: Path | str, problem: str) -> VrestoreError:
    return VrestoreError(f"{path}: {problem}")


def _check_size(path: Path | str, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise _bad(path, f"invalid frame size {width}x{height}")
    if width * height > MAX_PIXELS:
        raise _bad(path, f"frame size {width}x{height} is larger than the {MAX_PIXELS} pixels vrestore accepts")


def _plane(plane, dtype, width: int | None = None) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    arr = np.frombuffer(plane, dtype=dtype, count=plane.height * plane.line_size // itemsize)
    return arr.reshape(plane.height, plane.line_size // itemsize)[:, : width or plane.width]


def frame_to_rgb(frame: av.VideoFrame, colour: ColourInfo) -> tuple[np.ndarray, int]:
    """Convert any decoded frame to RGB with our own matrix/range handling.
    Returns the array and the source bit depth. Alpha is dropped."""
    fmt = frame.format
    name = fmt.name
    bits = fmt.components[0].bits if fmt.components else 8
    little = not fmt.is_big_endian
    n_planes = len({c.plane for c in fmt.components})
    planar_yuv = name.startswith(("yuv", "yuvj")) and n_planes >= 3 and little
    if planar_yuv and bits <= 16:
        dt = np.uint8 if bits <= 8 else np.uint16
        y, u, v = (_plane(frame.planes[i], dt) for i in range(3))
        return planes_to_rgb(y, u, v, colour, bits), bits
    if name in ("gray", "gray10le", "gray12le", "gray16le") or (name.startswith("gray") and little):
        dt = np.uint8 if bits <= 8 else np.uint16
        return planes_to_rgb(_plane(frame.planes[0], dt), None, None, ColourInfo(colour.matrix, True), bits), bits
    if fmt.is_rgb or fmt.has_palette or name.startswith(("gbr", "ya", "gray")):
        if bits > 8:
            return frame.to_ndarray(format="rgb48le"), bits
        return frame.to_ndarray(format="rgb24"), bits
    # Semi-planar or packed YUV (nv12, p010, yuyv422, ...): let swscale repack, keep our matrix.
    target = "yuv444p" if bits <= 8 else "yuv444p16le"
    f2 = frame.reformat(format=target)
    dt = np.uint8 if bits <= 8 else np.uint16
    y, u, v = (_plane(f2.planes[i], dt) for i in range(3))
    return planes_to_rgb(y, u, v, colour, 8 if bits <= 8 else 16), bits


def _natural_key(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


class VideoReader:
    """Iterate the frames of a video file, a raw ``.yuv`` file (with a
    :class:`RawSpec`) or a folder of PNG frames, one at a time."""

    def __init__(self, path: str | os.PathLike, raw: RawSpec | None = None, max_frames: int | None = None):
        self.path = Path(path)
        self.max_frames = max_frames
        self.corrupt_packets = 0
        self.truncated = False
        self._container = None
        if not self.path.exists():
            raise _bad(self.path, "no such file or directory")
        if self.path.is_dir():
            self._open_frames()
        elif self.path.suffix.lower() in RAW_EXTS:
            if raw is None:
                raise _bad(self.path, "raw .yuv input needs its size (e.g. --size 1920x1080), pixel format and fps")
            self._open_raw(raw)
        else:
            self._open_container()

    # -- opening -----------------------------------------------------------
    def _open_container(self) -> None:
        try:
            c = av.open(str(self.path), metadata_errors="ignore")
        except (av.FFmpegError, UnicodeDecodeError, OSError) as e:
            raise _bad(self.path, f"not a readable video ({type(e).__name__}: {e})") from None
        self._container = c
        if not c.streams.video:
            c.close()
            raise _bad(self.path, "contains no video stream")
        s = c.streams.video[0]
        cc = s.codec_context
        if cc is None:
            c.close()
            raise _bad(self.path, "its video stream has an unknown or damaged codec")
        width, height = cc.width, cc.height
        try:
            _check_size(self.path, width, height)
        except VrestoreError:
            c.close()
            raise
        pix_fmt = cc.pix_fmt or (s.format.name if s.format else "") or "yuv420p"
        try:
            bits = av.VideoFormat(pix_fmt).components[0].bits
        except Exception:
            bits = 8
        fps = s.average_rate or s.guessed_rate or s.base_rate or Fraction(25)
        tb = s.time_base or Fraction(1, 1) / fps
        duration = float(s.duration * tb) if s.duration else (c.duration / 1e6 if c.duration else None)
        n = s.frames or (round(duration * fps) if duration else None)
        colour = ColourInfo.from_tags(cc.colorspace, cc.color_range, cc.color_primaries, cc.color_trc,
                                      height, pix_fmt)
        streams = [{"index": x.index, "type": x.type, "codec": x.codec_context.name if x.codec_context else None}
                   for x in c.streams]
        self.info = VideoInfo(str(self.path), "container", width, height, Fraction(fps), Fraction(tb), n,
                              cc.name, pix_fmt, bits, colour, duration, streams)

    def _open_raw(self, raw: RawSpec) -> None:
        if raw.pix_fmt not in RAW_FORMATS:
            raise _bad(self.path, f"unsupported raw pixel format {raw.pix_fmt!r}; use one of {sorted(RAW_FORMATS)}")
        _check_size(self.path, raw.width, raw.height)
        bits, sx, sy, chroma = RAW_FORMATS[raw.pix_fmt]
        item = 1 if bits <= 8 else 2
        cw, ch = -(-raw.width // sx), -(-raw.height // sy)
        self._raw_planes = [(raw.height, raw.width)] + ([(ch, cw)] * 2 if chroma else [])
        self._raw_frame_bytes = sum(h * w for h, w in self._raw_planes) * item
        size = self.path.stat().st_size
        n, rest = divmod(size, self._raw_frame_bytes)
        if rest:
            self.truncated = True
            log.warning("%s: %d trailing bytes do not make a whole %dx%d %s frame; ignored",
                        self.path, rest, raw.width, raw.height, raw.pix_fmt)
        matrix = raw.matrix or ("bt709" if raw.height >= 720 else "bt601")
        colour = ColourInfo(matrix, raw.full_range)
        self._raw = raw
        self.info = VideoInfo(str(self.path), "raw", raw.width, raw.height, Fraction(raw.fps),
                              1 / Fraction(raw.fps), n, "rawvideo", raw.pix_fmt, bits, colour,
                              n / float(raw.fps))

    def _open_frames(self) -> None:
        files = sorted((p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_EXTS), key=_natural_key)
        if not files:
            raise _bad(self.path, "folder holds no .png frames")
        self._files = files
        first = self._decode_image(files[0])
        h, w = first.height, first.width
        _check_size(files[0], w, h)
        bits = first.format.components[0].bits
        fps = Fraction(25)
        self.info = VideoInfo(str(self.path), "frames", w, h, fps, 1 / fps, len(files), "png",
                              first.format.name, bits, ColourInfo("bt709", True), len(files) / 25.0)

    @staticmethod
    def _decode_image(path: Path) -> av.VideoFrame:
        try:
            with av.open(str(path)) as c:
                for f in c.decode(video=0):
                    return f
        except (av.FFmpegError, OSError) as e:
            raise _bad(path, f"not a readable image ({e})") from None
        raise _bad(path, "image holds no picture")

    # -- iteration ---------------------------------------------------------
    def __iter__(self) -> Iterator[Frame]:
        kind = self.info.kind
        it = self._iter_container() if kind == "container" else self._iter_raw() if kind == "raw" else \
            self._iter_frames()
        for i, fr in enumerate(it):
            if self.max_frames is not None and i >= self.max_frames:
                break
            yield fr

    def _iter_container(self) -> Iterator[Frame]:
        c = self._container
        if c is None:
            self._open_container()
            c = self._container
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        idx = 0
        demux = c.demux(s)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.FFmpegError as e:  # a truncated or broken container: keep what decoded
                self.truncated = True
                log.warning("%s: stopped reading at frame %d: %s", self.path, idx, e)
                break
            try:
                decoded = packet.decode()
            except av.FFmpegError as e:
                self.corrupt_packets += 1
                log.warning("%s: skipped a corrupt packet after frame %d: %s", self.path, idx, e)
                continue
            for f in decoded:
                rgb, _ = frame_to_rgb(f, self.info.colour)
                if rgb.shape[:2] != (self.info.height, self.info.width):
                    raise _bad(self.path, f"frame {idx} changes size to {rgb.shape[1]}x{rgb.shape[0]}; "
                                          "resolution changes mid-stream are not supported")
                yield Frame(rgb, idx, f.pts, float(f.time) if f.time is not None else None)
                idx += 1
        self.close()
        self._container = None

    def _iter_raw(self) -> Iterator[Frame]:
        raw = self._raw
        bits = self.info.bit_depth
        dt = np.uint8 if bits <= 8 else np.dtype("<u2")
        with open(self.path, "rb") as fh:
            for idx in range(self.info.num_frames or 0):
                buf = fh.read(self._raw_frame_bytes)
                arr = np.frombuffer(buf, dtype=dt)
                planes, off = [], 0
                for h, w in self._raw_planes:
                    planes.append(arr[off: off + h * w].reshape(h, w))
                    off += h * w
                y = planes[0]
                u, v = (planes[1], planes[2]) if len(planes) == 3 else (None, None)
                yield Frame(planes_to_rgb(y, u, v, self.info.colour, bits), idx, idx, idx / float(raw.fps))

    def _iter_frames(self) -> Iterator[Frame]:
        for idx, p in enumerate(self._files):
            f = self._decode_image(p)
            if (f.width, f.height) != (self.info.width, self.info.height):
                raise _bad(p, f"frame is {f.width}x{f.height}, the first frame was "
                              f"{self.info.width}x{self.info.height}")
            rgb, _ = frame_to_rgb(f, self.info.colour)
            yield Frame(rgb, idx, idx, idx / float(self.info.fps))

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def probe(path: str | os.PathLike, raw: RawSpec | None = None) -> VideoInfo:
    """Stream facts without decoding."""
    with VideoReader(path, raw) as r:
        return r.info


def packet_sizes(path: str | os.PathLike) -> list[int]:
    """Compressed size of each video frame in display order (for PQF detection)."""
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            pk = [(p.pts if p.pts is not None else i, p.size) for i, p in enumerate(c.demux(s)) if p.size]
    except (av.FFmpegError, IndexError) as e:
        raise _bad(path, f"cannot read packets ({e})") from None
    return [size for _, size in sorted(pk)]


# ---------------------------------------------------------------------------
# Writing

#: codec name -> (encoder, default container extension)
CODECS = {"x264": ("libx264", ".mp4"), "x265": ("libx265", ".mp4"), "ffv1": ("ffv1", ".mkv"),
          "png": ("png", "")}


def _fill_plane(plane, arr: np.ndarray) -> None:
    item = arr.dtype.itemsize
    width = plane.line_size // item
    if arr.shape[1] != width:
        buf = np.zeros((plane.height, width), arr.dtype)
        buf[:, : arr.shape[1]] = arr
        arr = buf
    plane.update(np.ascontiguousarray(arr).tobytes())


MIN_SIDE = 16  # the smallest picture side x265 encodes (its smallest coding-tree unit)


def ctu_size(width: int, height: int) -> int:
    """HM's 64 px coding-tree units, smaller where a side is 64 px or less:
    x265 codes such pictures differently from run to run with 64 px CTUs
    (measured: a 128x128 crop of bikes at x4, 32x32, gave a new bitstream
    on most encodes; 64x64 and 64x80 crops of carphone the same; a 32 px
    side with 32 px CTUs too), and with CTUs below the side length it does
    not (ten encodes each, one bitstream)."""
    side = min(width, height)
    return 64 if side > 64 else 32 if side > 32 else MIN_SIDE


def temp_path_for(path: Path) -> Path:
    """Hidden sibling name used while a file is written; keeps the extension
    so the muxer is chosen from it."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


class VideoWriter:
    """Encode RGB frames to a file (or a folder of PNGs for ``codec='png'``).

    ``fps`` and ``time_base`` should come from the source; frame ``pts`` are
    in ``time_base`` (defaults to 1/fps with consecutive pts). ``audio_from``
    names a container whose audio and subtitle streams are copied untouched.
    """

    def __init__(self, path: str | os.PathLike, *, fps: Fraction | float = 25, time_base: Fraction | None = None,
                 codec: str = "x264", quality: int | None = None, colour: ColourInfo | None = None,
                 audio_from: str | os.PathLike | None = None, overwrite: bool = False,
                 encoder_options: dict[str, str] | None = None):
        if codec not in CODECS:
            raise VrestoreError(f"unknown codec {codec!r}; choose one of {', '.join(CODECS)}")
        self.path = Path(path)
        self.codec = codec
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        self.time_base = Fraction(time_base) if time_base else 1 / self.fps
        self.quality = quality
        self.colour = colour or ColourInfo()
        self.audio_from = Path(audio_from) if audio_from else None
        self.encoder_options = dict(encoder_options or {})
        if self.path.exists() and not overwrite:
            raise _bad(self.path, "already exists (pass --overwrite to replace it)")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if not parent.is_dir():
            raise _bad(self.path, f"output folder {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise _bad(self.path, f"output folder {parent} is not writable")
        self.tmp = temp_path_for(self.path)
        self.frames_written = 0
        self._container = None
        self._stream = None
        self._aux = None
        self._aux_pending = None
        self._png = None

    # -- set-up on the first frame ------------------------------------------
    def _start(self, rgb: np.ndarray) -> None:
        h, w = rgb.shape[:2]
        deep = rgb.dtype == np.uint16
        if self.codec == "png":
            self.tmp.mkdir(parents=False, exist_ok=False)
            self._png = av.CodecContext.create("png", "w")
            self._png.width, self._png.height = w, h
            self._png.pix_fmt = "rgb48be" if deep else "rgb24"
            return
        try:
            oc = av.open(str(self.tmp), "w")
        except (av.FFmpegError, OSError) as e:
            raise _bad(self.path, f"cannot create output ({e})") from None
        self._container = oc
        enc, _ = CODECS[self.codec]
        st = oc.add_stream(enc, rate=self.fps)
        st.width, st.height = w, h
        if self.codec == "ffv1":
            st.pix_fmt = "gbrp16le" if deep else "bgr0"
            opts = {"level": "3", "slicecrc": "1"}
        else:
            odd = (w % 2) or (h % 2)
            st.pix_fmt = ("yuv444p" if odd else "yuv420p") + ("10le" if deep else "")
            crf = self.quality if self.quality is not None else (18 if self.codec == "x264" else 20)
            opts = {"crf": str(crf), "preset": "medium"}
            if self.codec == "x265":
                opts["x265-params"] = "log-level=error"
        opts.update(self.encoder_options)
        if self.codec == "x265":
            given = opts.get("x265-params", "")
            # Small pictures: x265 codes them differently from run to run with
            # its 64 px units (``ctu_size``); and it corrupts the heap in its
            # CU-tree pass for frames narrower than 49 px (measured with glibc's
            # malloc checks); without CU-tree it is clean.
            extra = [] if "ctu=" in given or min(w, h) < MIN_SIDE else [f"ctu={ctu_size(w, h)}"]
            extra += ["cutree=0"] if w < 64 else []
            opts["x265-params"] = ":".join(filter(None, [given, *extra]))
        st.options = opts
        st.codec_context.time_base = self.time_base
        st.time_base = self.time_base
        for k, v in self.colour.tags.items():
            try:
                setattr(st.codec_context, k, v)
            except (AttributeError, ValueError, TypeError):
                pass
        self._stream = st
        if self.audio_from is not None:
            self._open_aux(oc)

    def _open_aux(self, oc) -> None:
        try:
            src = av.open(str(self.audio_from))
        except (av.FFmpegError, OSError):
            return
        mapping = {}
        for s in src.streams:
            if s.type in ("audio", "subtitle"):
                try:
                    mapping[s.index] = oc.add_stream_from_template(s)
                except (ValueError, av.FFmpegError) as e:
                    log.warning("%s: cannot carry %s stream %d into %s (%s); dropped",
                                self.audio_from, s.type, s.index, self.path.suffix, e)
        if not mapping:
            src.close()
            return
        self._aux = (src, mapping, src.demux(*[s for s in src.streams if s.index in mapping]))

    def _pump_aux(self, until: float | None) -> None:
        """Mux passthrough packets up to ``until`` seconds (all if None) so the
        output stays interleaved."""
        if self._aux is None:
            return
        src, mapping, it = self._aux
        while True:
            pkt = self._aux_pending
            if pkt is None:
                try:
                    pkt = next(it)
                except (StopIteration, av.FFmpegError):
                    src.close()
                    self._aux = None
                    return
            if pkt.dts is None and pkt.pts is None:
                self._aux_pending = None
                continue
            t = float((pkt.pts if pkt.pts is not None else pkt.dts) * pkt.time_base)
            if until is not None and t > until:
                self._aux_pending = pkt
                return
            self._aux_pending = None
            pkt.stream = mapping[pkt.stream.index]
            self._container.mux(pkt)

    # -- writing --------------------------------------------------------------
    def write(self, rgb: np.ndarray, pts: int | None = None) -> None:
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"expected (H, W, 3) uint8/uint16 RGB, got {rgb.shape} {rgb.dtype}")
        if self._container is None and self._png is None:
            self._start(rgb)
        if self._png is not None:
            fmt = "rgb48le" if rgb.dtype == np.uint16 else "rgb24"
            frame = av.VideoFrame.from_ndarray(rgb, format=fmt)
            data = b"".join(bytes(p) for p in self._png.encode(frame))
            (self.tmp / f"{self.frames_written:06d}.png").write_bytes(data)
            self.frames_written += 1
            return
        st = self._stream
        pts = self.frames_written if pts is None else pts
        if self.codec == "ffv1":
            fmt = "rgb48le" if rgb.dtype == np.uint16 else "rgb24"
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format=fmt).reformat(format=st.pix_fmt)
        else:
            frame = av.VideoFrame(rgb.shape[1], rgb.shape[0], st.pix_fmt)
            sub = (1, 1) if st.pix_fmt.startswith("yuv444") else (2, 2)
            planes = rgb_to_planes(rgb, self.colour, 10 if rgb.dtype == np.uint16 else 8, sub)
            for plane, arr in zip(frame.planes, planes, strict=True):
                _fill_plane(plane, arr)
            for k, v in self.colour.tags.items():
                try:
                    setattr(frame, k, v)
                except (AttributeError, ValueError, TypeError):
                    pass
        frame.pts = pts
        frame.time_base = self.time_base
        for packet in st.encode(frame):
            self._container.mux(packet)
        self.frames_written += 1
        self._pump_aux(float(pts * self.time_base))

    def close(self) -> None:
        """Flush, finish the file and move it to its final name."""
        if self._png is not None:
            self._png = None
            if self.path.exists():
                shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
            os.replace(self.tmp, self.path)
            return
        if self._container is None:
            raise _bad(self.path, "no frames were written")
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._pump_aux(None)
        self._container.close()
        self._container = None
        if self.path.is_dir():
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the partial output; the final name is never touched."""
        if self._aux is not None:
            self._aux[0].close()
            self._aux = None
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - already failing; cleanup must go on
                pass
            self._container = None
        self._png = None
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif self.tmp.exists():
            self.tmp.unlink()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
