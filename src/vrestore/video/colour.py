"""YUV <-> RGB conversion that honours the colour matrix and range of a stream.

We do the arithmetic ourselves (not swscale's defaults) so that the matrix and
range tagged in a file are always the ones applied, and so that a round trip
through 4:2:0 is predictable: chroma is averaged 2x2 going down and
interpolated bilinearly (centre sited) going up, which keeps flat colours exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Luma coefficients (Kr, Kb) of each matrix.
_KR_KB = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}

# FFmpeg's AVColorSpace codes -> our matrix names.
_AVCOL_SPC = {1: "bt709", 5: "bt601", 6: "bt601", 4: "bt601", 9: "bt2020", 10: "bt2020"}
_MATRIX_TO_AVCOL_SPC = {"bt709": 1, "bt601": 6, "bt2020": 9}


@dataclass(frozen=True)
class ColourInfo:
    """The colour description of a stream: the matrix and range used for
    conversion, plus the raw tags (FFmpeg enum values) carried to outputs."""

    matrix: str = "bt709"
    full_range: bool = False
    primaries: int = 2  # 2 = unspecified
    transfer: int = 2
    colorspace: int = 2

    @staticmethod
    def from_tags(colorspace: int | None, color_range: int | None, primaries: int | None,
                  transfer: int | None, height: int, pix_fmt: str = "") -> ColourInfo:
        """Build from stream tags; guess like FFmpeg players do when untagged
        (BT.709 for HD, BT.601 for SD; full range only for yuvj formats)."""
        spc = int(colorspace or 2)
        matrix = _AVCOL_SPC.get(spc) or ("bt709" if height >= 720 else "bt601")
        if color_range in (1, 2):
            full = color_range == 2
        else:
            full = pix_fmt.startswith("yuvj")
        return ColourInfo(matrix, full, int(primaries or 2), int(transfer or 2), spc)

    @property
    def tags(self) -> dict[str, int]:
        """FFmpeg tag values to write on an output stream."""
        spc = self.colorspace if self.colorspace != 2 else _MATRIX_TO_AVCOL_SPC[self.matrix]
        return {"colorspace": spc, "color_range": 2 if self.full_range else 1,
                "color_primaries": self.primaries, "color_trc": self.transfer}


def luma_weights(matrix: str) -> tuple[float, float, float]:
    """(Kr, Kg, Kb): the weights of R, G and B in the luma of a colour matrix ("bt601", "bt709", "bt2020")."""
    try:
        kr, kb = _KR_KB[matrix]
    except KeyError:
        raise ValueError(f"unknown colour matrix {matrix!r}; expected one of {sorted(_KR_KB)}") from None
    return kr, 1.0 - kr - kb, kb


def _scales(full_range: bool, bit_depth: int) -> tuple[float, float, float, float]:
    """(y_offset, y_scale, c_offset, c_scale) in code values of the given depth."""
    m = float(1 << (bit_depth - 8))
    if full_range:
        top = float((1 << bit_depth) - 1)
        return 0.0, top, 128.0 * m, top
    return 16.0 * m, 219.0 * m, 128.0 * m, 224.0 * m


def rgb_to_yuv444(rgb: np.ndarray, matrix: str, full_range: bool, bit_depth: int = 8) -> np.ndarray:
    """Float RGB in [0, 1], (H, W, 3) -> float YUV code values (3, H, W), unrounded."""
    kr, kg, kb = luma_weights(matrix)
    r, g, b = (rgb[..., i].astype(np.float32) for i in range(3))
    y = kr * r + kg * g + kb * b
    pb = (b - y) / (2.0 * (1.0 - kb))
    pr = (r - y) / (2.0 * (1.0 - kr))
    yo, ys, co, cs = _scales(full_range, bit_depth)
    return np.stack([yo + ys * y, co + cs * pb, co + cs * pr])


def yuv444_to_rgb(yuv: np.ndarray, matrix: str, full_range: bool, bit_depth: int = 8) -> np.ndarray:
    """Float YUV code values (3, H, W) -> float RGB (H, W, 3), not clipped."""
    kr, kg, kb = luma_weights(matrix)
    yo, ys, co, cs = _scales(full_range, bit_depth)
    y = (yuv[0].astype(np.float32) - yo) / ys
    pb = (yuv[1].astype(np.float32) - co) / cs
    pr = (yuv[2].astype(np.float32) - co) / cs
    r = y + 2.0 * (1.0 - kr) * pr
    b = y + 2.0 * (1.0 - kb) * pb
    g = (y - kr * r - kb * b) / kg
    return np.stack([r, g, b], axis=-1)


def downsample_chroma(c: np.ndarray, sx: int, sy: int) -> np.ndarray:
    """Average sx x sy blocks (edge-replicated for odd sizes)."""
    if sx == 1 and sy == 1:
        return c
    h, w = c.shape
    ph, pw = (-h) % sy, (-w) % sx
    if ph or pw:
        c = np.pad(c, ((0, ph), (0, pw)), mode="edge")
    h2, w2 = c.shape[0] // sy, c.shape[1] // sx
    return c.reshape(h2, sy, w2, sx).mean(axis=(1, 3))


def _upsample_axis(c: np.ndarray, axis: int, out_len: int) -> np.ndarray:
    """Bilinear x2 along one axis with centre siting (weights 3/4, 1/4), clamped edges."""
    prev = np.concatenate([np.take(c, [0], axis=axis), np.take(c, range(c.shape[axis] - 1), axis=axis)], axis)
    nxt = np.concatenate([np.take(c, range(1, c.shape[axis]), axis=axis), np.take(c, [-1], axis=axis)], axis)
    even = 0.75 * c + 0.25 * prev
    odd = 0.75 * c + 0.25 * nxt
    out = np.stack([even, odd], axis=axis + 1)
    shape = list(c.shape)
    shape[axis] *= 2
    out = out.reshape(shape)
    return np.take(out, range(out_len), axis=axis)


def upsample_chroma(c: np.ndarray, sx: int, sy: int, height: int, width: int) -> np.ndarray:
    c = c.astype(np.float32)
    if sy == 2:
        c = _upsample_axis(c, 0, height)
    if sx == 2:
        c = _upsample_axis(c, 1, width)
    return c


def to_uint(x: np.ndarray, bit_depth: int) -> np.ndarray:
    """Round and clip float code values to the integer type of the depth."""
    top = (1 << bit_depth) - 1
    dtype = np.uint8 if bit_depth <= 8 else np.uint16
    return np.clip(np.rint(x), 0, top).astype(dtype)


def planes_to_rgb(y: np.ndarray, u: np.ndarray | None, v: np.ndarray | None, colour: ColourInfo,
                  bit_depth: int) -> np.ndarray:
    """Integer Y, U, V planes (chroma possibly subsampled) -> RGB uint8, or
    uint16 scaled to the full 16-bit range for sources deeper than 8 bits."""
    h, w = y.shape
    if u is None or v is None:  # grey: chroma at the neutral value
        mid = float(128 << (bit_depth - 8))
        u = v = np.full((h, w), mid, np.float32)
    sx = 1 if u.shape[1] == w else 2
    sy = 1 if u.shape[0] == h else 2
    yuv = np.stack([y.astype(np.float32), upsample_chroma(u, sx, sy, h, w), upsample_chroma(v, sx, sy, h, w)])
    rgb = np.clip(yuv444_to_rgb(yuv, colour.matrix, colour.full_range, bit_depth), 0.0, 1.0)
    if bit_depth <= 8:
        return to_uint(rgb * 255.0, 8)
    return to_uint(rgb * 65535.0, 16)


def rgb_to_planes(rgb: np.ndarray, colour: ColourInfo, bit_depth: int, subsampling: tuple[int, int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RGB uint8/uint16 (H, W, 3) -> integer Y, U, V planes with the given
    chroma subsampling (sx, sy) at the given bit depth."""
    scale = 255.0 if rgb.dtype == np.uint8 else 65535.0
    yuv = rgb_to_yuv444(rgb.astype(np.float32) / scale, colour.matrix, colour.full_range, bit_depth)
    sx, sy = subsampling
    u = downsample_chroma(yuv[1], sx, sy)
    v = downsample_chroma(yuv[2], sx, sy)
    return to_uint(yuv[0], bit_depth), to_uint(u, bit_depth), to_uint(v, bit_depth)
