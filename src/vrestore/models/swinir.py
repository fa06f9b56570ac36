"""SwinIR (Liang et al., 2021): residual Swin transformer groups for image restoration.

Parameter and buffer names follow the released SwinIR files (KAIR's layout),
so published weights load unchanged. Differences in how, not what: window
attention is two batched matmuls and a softmax (``window_attention``), each Swin block processes
its windows in chunks (norm, attention and MLP are all window-local once the
cyclic shift is applied), so memory stays bounded for large frames without
tiling; shift masks are computed for the actual input size, cached, and
applied to the edge windows only (the others would add zeros). Inside a
residual group the tokens stay in window order: one gather takes them from
one block's windows to the next block's shifted windows, where the published
code reverses the partition, rolls and partitions again (copies of the
whole feature map; on glibc's default heap, which page-faults each large
temporary in afresh, they took a third of SwinIR-T's time on a CPU); traced
graphs keep that form, whose sizes stay symbolic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_arch, register_model

T = TypeVar("T")

RGB_MEAN = (0.4488, 0.4371, 0.4040)


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, ws*ws, C)"""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, b: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def shift_mask(h: int, w: int, ws: int, shift: int, windows: list[int] | None = None) -> torch.Tensor:
    """(nW, N, N) additive mask (0 / -100) separating regions that the cyclic
    shift brought together; ``windows``: only those windows' masks, (len, N, N).
    The dense form grows with the image (530 MB in float32 for a 1920x1080
    frame, 2 GB for 3840x2160, per shifted block), so the eager blocks build
    the few edge windows' alone (``edge_windows``)."""
    img = torch.zeros(1, h, w, 1, dtype=torch.uint8)  # region labels, 0 to 8
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    mw = window_partition(img, ws).squeeze(-1)
    if windows is not None:
        mw = mw[torch.tensor(windows, dtype=torch.long)]
    return torch.zeros(mw.shape[0], ws * ws, ws * ws).masked_fill(mw.unsqueeze(1) != mw.unsqueeze(2), -100.0)


def cached_for_size(owner: nn.Module, attr: str, key: tuple, build: Callable[[], T]) -> T:
    """What ``owner.<attr>`` holds as (key, value) for the last input size and device, else ``build()``, which
    replaces it: a video's frames share one size, so frames after the first build nothing. Built outside
    inference mode, since a later training call at that size may save the tensors for backward."""
    held = getattr(owner, attr)
    if held is None or held[0] != key:
        with torch.inference_mode(False):
            held = (key, build())
        setattr(owner, attr, held)
    return held[1]


def edge_windows(h: int, w: int, ws: int) -> list[int]:
    """Indices (ascending) of the windows that ``shift_mask`` does not leave at
    zero: the last column and the last row of windows, where the cyclic shift
    brings two regions together. Plain integers from the sizes, so that
    ``torch.compile`` sees constants rather than a data-dependent ``nonzero``."""
    nh, nw = h // ws, w // ws
    return [r * nw + nw - 1 for r in range(nh - 1)] + list(range((nh - 1) * nw, nh * nw))


def _window_order(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """For each token in window order (``window_partition``) of the image
    rolled by ``-shift``, its index in the image's row-major order."""
    rows = (torch.arange(h) + shift) % h
    cols = (torch.arange(w) + shift) % w
    src = (rows[:, None] * w + cols[None, :]).view(h // ws, ws, w // ws, ws).permute(0, 2, 1, 3)
    return src.reshape(-1)


def reorder_index(h: int, w: int, ws: int, src: int | None, dst: int | None) -> torch.Tensor:
    """Index for ``index_select`` that takes tokens from order ``src`` to
    order ``dst``: ``None`` is the image's row-major order, an integer the
    window order of the image shifted by that much. One gather instead of
    reverse, roll and partition."""
    want = torch.arange(h * w) if dst is None else _window_order(h, w, ws, dst)
    if src is None:
        return want
    position = torch.empty(h * w, dtype=torch.long)
    position[_window_order(h, w, ws, src)] = torch.arange(h * w)
    return position[want]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v for q, k, v (B', heads, N, d) and
    bias broadcastable to (B', heads, N, N); returns (B', N, heads * d).
    Written out rather than ``scaled_dot_product_attention``: with windows of
    64 tokens and heads of 8 to 16 channels, the CPU's flash kernel (built for
    long sequences) runs at half the speed of two batched matmuls and a
    softmax (``benchmarks/run.py attention``). Other devices keep the fused
    kernel, which is what the GPU benchmark measured."""
    if q.device.type != "cpu":
        b, h, n, d = q.shape
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, n, h * d)
    d = q.shape[-1]
    outs = []
    for j in range(q.shape[1]):  # head by head: baddbmm broadcasts the head's bias instead of a copy per window
        scores = torch.baddbmm(bias[:, j], q[:, j], k[:, j].transpose(1, 2), alpha=d ** -0.5)
        outs.append(torch.bmm(scores.softmax(-1), v[:, j]))
    return torch.cat(outs, -1)


class WindowAttention(nn.Module):
    def __init__(self, dim: int, ws: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.ws = ws
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(ws), persistent=True)
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def bias(self) -> torch.Tensor:
        n = self.ws * self.ws
        idx = self.relative_position_index.view(-1)
        return self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                edges: torch.Tensor | None = None) -> torch.Tensor:
        """x (B', N, C) windows. ``mask``: without ``edges``, (B', N, N) for
        every window (the dense form, for traced graphs); with ``edges``, the
        masks (E, N, N) of the windows listed in ``edges`` (E,), the only ones
        whose mask is not all zero: only those pay for it, the others share
        the broadcast position bias, which saves building a (B', heads, N, N)
        bias that costs more than the attention itself."""
        bw, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(bw, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn_bias = self.bias().to(q.dtype).unsqueeze(0)  # (1, h, N, N)
        if mask is not None and edges is None:
            attn_bias = attn_bias + mask.to(q.dtype).unsqueeze(1)
        out = window_attention(q, k, v, attn_bias)
        if edges is not None and edges.numel():
            edge_bias = attn_bias + mask.to(q.dtype).unsqueeze(1)
            edge = window_attention(q[edges], k[edges], v[edges], edge_bias)
            # in place when no graph is recorded: an out-of-place copy of every window costs a full pass
            out = out.index_copy(0, edges, edge) if torch.is_grad_enabled() else out.index_copy_(0, edges, edge)
        return self.proj(out)


class SwinTransformerBlock(nn.Module):
    #: windows processed at once; bounds the attention and MLP memory of a block
    chunk_windows = 4096

    def __init__(self, dim: int, num_heads: int, ws: int, shift: int, mlp_ratio: float):
        super().__init__()
        self.ws, self.shift = ws, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, ws, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._mask_cache: tuple[tuple, torch.Tensor] | None = None
        self._plan: tuple[tuple, list] | None = None

    def _mask(self, h: int, w: int, device: torch.device) -> torch.Tensor | None:
        """The dense shift mask for an h x w input (cached for the last size), for the traced ``forward``."""
        if not self.shift:
            return None
        return cached_for_size(self, "_mask_cache", (h, w, device),
                               lambda: shift_mask(h, w, self.ws, self.shift).to(device))

    def _chunks(self, h: int, w: int, b: int, device: torch.device) -> list[tuple]:
        """``forward_windows``' chunks of the b*nW windows: (start, end, the
        chunk's edge windows, their masks), or None for both in an unshifted
        block; built once per size (``cached_for_size``)."""
        return cached_for_size(self, "_plan", (h, w, b, self.chunk_windows, device),
                               lambda: self._plan_chunks(h, w, b, device))

    def _plan_chunks(self, h: int, w: int, b: int, device: torch.device) -> list[tuple]:
        nw = (h // self.ws) * (w // self.ws)
        one = edge_windows(h, w, self.ws) if self.shift else []  # one image's edge windows, and their masks
        masks = shift_mask(h, w, self.ws, self.shift, one).to(device) if one else None
        edges = [(img * nw + e, k) for img in range(b) for k, e in enumerate(one)]
        plan = []
        for i in range(0, b * nw, self.chunk_windows):
            j = min(i + self.chunk_windows, b * nw)
            if masks is None:
                plan.append((i, j, None, None))
                continue
            sel = [(e, k) for e, k in edges if i <= e < j]
            plan.append((i, j, torch.tensor([e - i for e, _ in sel], dtype=torch.long, device=device),
                         masks[torch.tensor([k for _, k in sel], dtype=torch.long, device=device)]))
        return plan

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x (B, H*W, C) in image order, as the published block: partition,
        roll and a dense mask over all windows at once. Traced graphs use this
        form (its sizes stay symbolic); eager code runs ``forward_windows``."""
        h, w = hw
        b, _, c = x.shape
        ws = self.ws
        x = x.view(b, h, w, c)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        win = window_partition(x, ws)  # (b*nW, N, C)
        mask = self._mask(h, w, x.device)
        if mask is not None:
            mask = mask.repeat(b, 1, 1)
        win = win + self.attn(self.norm1(win), mask)
        win = win + self.mlp(self.norm2(win))
        x = window_reverse(win, ws, b, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x.reshape(b, h * w, c)

    def forward_windows(self, y: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """y (B, H*W, C) already in this block's window order (``reorder_index``
        with its shift). Windows go through in chunks of ``chunk_windows``;
        without gradients the result is written into ``y`` itself, which the
        caller must own (a gather's output), so no chunk is copied twice."""
        h, w = hw
        b, hw_tokens, c = y.shape
        win = y.view(-1, self.ws * self.ws, c)
        in_place = not torch.is_grad_enabled()
        outs = []
        for i, j, e_idx, e_mask in self._chunks(h, w, b, y.device):
            chunk = win[i:j]
            a = self.attn(self.norm1(chunk), e_mask, e_idx)
            if in_place:
                chunk.add_(a)
                chunk.add_(self.mlp(self.norm2(chunk)))
            else:
                chunk = chunk + a
                outs.append(chunk + self.mlp(self.norm2(chunk)))
        if in_place:
            return y
        return (torch.cat(outs) if len(outs) > 1 else outs[0]).view(b, hw_tokens, c)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Released files carry ``attn_mask`` computed for their training size;
        # we recompute masks for each input size, so the buffer is accepted and
        # checked against our own computation when its size is known.
        key = prefix + "attn_mask"
        if key in state_dict:
            given = state_dict.pop(key)
            if self.shift and given.dim() == 3:
                side = int(round(given.shape[0] ** 0.5)) * self.ws
                ours = shift_mask(side, side, self.ws, self.shift)
                if ours.shape != given.shape or not torch.equal(ours, given.to(ours.dtype)):
                    raise ValueError(f"{key}: attention mask does not match this architecture")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class RSTB(nn.Module):
    """Residual Swin transformer group: blocks, a conv, and a long skip."""

    def __init__(self, dim: int, depth: int, num_heads: int, ws: int, mlp_ratio: float, resi_connection: str):
        super().__init__()
        self.residual_group = nn.Module()
        self.residual_group.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, ws, 0 if i % 2 == 0 else ws // 2, mlp_ratio) for i in range(depth)])
        if resi_connection == "1conv":
            self.conv = nn.Conv2d(dim, dim, 3, 1, 1)
        elif resi_connection == "3conv":
            self.conv = nn.Sequential(nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, True),
                                      nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, True),
                                      nn.Conv2d(dim // 4, dim, 3, 1, 1))
        else:
            raise ValueError(f"resi_connection must be 1conv or 3conv, got {resi_connection!r}")
        self._order_cache: tuple[tuple, list[torch.Tensor]] | None = None

    def _orders(self, hw: tuple[int, int], device: torch.device) -> list[torch.Tensor]:
        """The gathers of ``forward``: image order into the first block's
        windows, each block's windows into the next one's, the last back to
        image order; built once per size and device (``cached_for_size``), so a
        GPU receives them once."""
        blocks = self.residual_group.blocks
        shifts = [None, *(blk.shift for blk in blocks), None]
        return cached_for_size(self, "_order_cache", (hw, device), lambda: [
            reorder_index(*hw, blocks[0].ws, a, b).to(device) for a, b in zip(shifts, shifts[1:], strict=False)])

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        y = x
        if torch.jit.is_tracing():
            for blk in self.residual_group.blocks:
                y = blk(y, hw)
        else:  # window order from block to block: one gather per block and one back
            orders = self._orders(hw, y.device)
            for blk, order in zip(self.residual_group.blocks, orders[:-1], strict=True):
                y = blk.forward_windows(y.index_select(1, order), hw)
            y = y.index_select(1, orders[-1])
        b, _, c = y.shape
        y = y.transpose(1, 2).reshape(b, c, *hw)
        return self.conv(y).flatten(2).transpose(1, 2) + x


@dataclass
class SwinIRConfig:
    upscale: int = 1
    in_chans: int = 3
    img_size: int = 128
    window_size: int = 8
    img_range: float = 1.0
    depths: list[int] = field(default_factory=lambda: [6, 6, 6, 6, 6, 6])
    embed_dim: int = 180
    num_heads: list[int] = field(default_factory=lambda: [6, 6, 6, 6, 6, 6])
    mlp_ratio: float = 2.0
    upsampler: str = ""
    resi_connection: str = "1conv"
    patch_norm: bool = True
    num_feat: int = 64


@register_arch("swinir")
class SwinIR(nn.Module):
    """Input (N, 3, H, W) in [0, 1] -> (N, 3, sH, sW); any H, W (reflect-padded
    to a multiple of the window and cropped back)."""

    task = "image"

    def __init__(self, cfg: SwinIRConfig):
        super().__init__()
        self.cfg = cfg
        c, d = cfg.in_chans, cfg.embed_dim
        mean = RGB_MEAN if c == 3 else (0.0,) * c
        self.register_buffer("mean", torch.tensor(mean).view(1, c, 1, 1), persistent=False)
        self.conv_first = nn.Conv2d(c, d, 3, 1, 1)
        self.patch_embed = nn.Module()
        self.patch_embed.norm = nn.LayerNorm(d) if cfg.patch_norm else nn.Identity()
        ws = cfg.window_size
        if cfg.img_size <= ws:
            raise ValueError("img_size must exceed window_size")
        self.layers = nn.ModuleList([RSTB(d, dep, h, ws, cfg.mlp_ratio, cfg.resi_connection)
                                     for dep, h in zip(cfg.depths, cfg.num_heads, strict=True)])
        self.norm = nn.LayerNorm(d)
        if cfg.resi_connection == "1conv":
            self.conv_after_body = nn.Conv2d(d, d, 3, 1, 1)
        else:
            self.conv_after_body = nn.Sequential(nn.Conv2d(d, d // 4, 3, 1, 1), nn.LeakyReLU(0.2, True),
                                                 nn.Conv2d(d // 4, d // 4, 1, 1, 0), nn.LeakyReLU(0.2, True),
                                                 nn.Conv2d(d // 4, d, 3, 1, 1))
        nf = cfg.num_feat
        if cfg.upsampler == "pixelshuffle":
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(d, nf, 3, 1, 1), nn.LeakyReLU(inplace=True))
            layers: list[nn.Module] = []
            if cfg.upscale in (2, 4, 8):
                for _ in range(cfg.upscale.bit_length() - 1):
                    layers += [nn.Conv2d(nf, 4 * nf, 3, 1, 1), nn.PixelShuffle(2)]
            elif cfg.upscale == 3:
                layers += [nn.Conv2d(nf, 9 * nf, 3, 1, 1), nn.PixelShuffle(3)]
            else:
                raise ValueError(f"unsupported upscale {cfg.upscale}")
            self.upsample = nn.Sequential(*layers)
            self.conv_last = nn.Conv2d(nf, c, 3, 1, 1)
        elif cfg.upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(d, cfg.upscale**2 * c, 3, 1, 1), nn.PixelShuffle(cfg.upscale))
        elif cfg.upsampler == "":
            if cfg.upscale != 1:
                raise ValueError("upsampler '' (restoration) has upscale 1")
            self.conv_last = nn.Conv2d(d, c, 3, 1, 1)
        else:
            raise ValueError(f"unsupported upsampler {cfg.upsampler!r}")
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg: dict) -> SwinIR:
        return cls(SwinIRConfig(**cfg))

    def config(self) -> dict:
        return asdict(self.cfg)

    @property
    def scale(self) -> int:
        return self.cfg.upscale

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.patch_embed.norm(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            y = layer(y, (h, w))
        y = self.norm(y)
        return y.transpose(1, 2).reshape(b, c, h, w)

    def pad_sizes(self) -> tuple[int, int]:
        """(multiple, minimum) that input sides are padded to before the network."""
        return self.cfg.window_size, self.cfg.window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ws = self.cfg.window_size
        ph, pw = (ws - h % ws) % ws, (ws - w % ws) % ws
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        s = self.cfg.upscale
        return self.forward_padded(x)[..., : h * s, : w * s]

    def forward_padded(self, x: torch.Tensor) -> torch.Tensor:
        """The network on an input whose sides are multiples of the window
        (no size-dependent Python branches: it traces for export)."""
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.cfg.img_range
        if self.cfg.upsampler == "pixelshuffle":
            x = self.conv_first(x)
            x = self.conv_after_body(self.forward_features(x)) + x
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        elif self.cfg.upsampler == "pixelshuffledirect":
            x = self.conv_first(x)
            x = self.upsample(self.conv_after_body(self.forward_features(x)) + x)
        else:
            first = self.conv_first(x)
            res = self.conv_after_body(self.forward_features(first)) + first
            x = x + self.conv_last(res)
        return x / self.cfg.img_range + mean


register_model("swinir_m_color_dn", "swinir", embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, window_size=8,
               mlp_ratio=2.0, img_size=128)
register_model("swinir_s_color_dn", "swinir", embed_dim=60, depths=[4] * 4, num_heads=[6] * 4, window_size=8,
               mlp_ratio=2.0, img_size=64)
register_model("swinir_t_color_dn", "swinir", embed_dim=32, depths=[2, 2], num_heads=[4, 4], window_size=8,
               mlp_ratio=2.0, img_size=64)
# Two heads of 16 channels instead of four of 8: the same layers (the position-bias tables have a column
# per head); attention (most of SwinIR-T's time on a CPU) runs 2.26x faster, the whole network 1.56x
# (benchmarks/run.py attention, stage2; docs/models.md).
register_model("swinir_t2_color_dn", "swinir", embed_dim=32, depths=[2, 2], num_heads=[2, 2], window_size=8,
               mlp_ratio=2.0, img_size=64)
# swinir_t2 and swinir_t with a third residual group (1.5x their layers): is the bundled stage 2 bound by its size?
# ``model.transfer`` from the 2-group model starts the new group as the identity (docs/models.md).
register_model("swinir_t2_g3_color_dn", "swinir", embed_dim=32, depths=[2, 2, 2], num_heads=[2, 2, 2], window_size=8,
               mlp_ratio=2.0, img_size=64)
register_model("swinir_t_g3_color_dn", "swinir", embed_dim=32, depths=[2, 2, 2], num_heads=[4, 4, 4], window_size=8,
               mlp_ratio=2.0, img_size=64)
register_model("swinir_e24_color_dn", "swinir", embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=8,
               mlp_ratio=2.0, img_size=64)
