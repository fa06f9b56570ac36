"""BasicVSR++ (Chan et al., CVPR 2022) with TaoMC2's PQF propagation and a
growable reconstruction trunk.

Parameter names follow MMEditing's ``BasicVSRPlusPlus`` backbone so released
checkpoints load unchanged. Two input modes: low-resolution input with x2/x4
output, and same-size output for compressed-video enhancement (features and
flow at 1/4 size after two stride-2 convs; inputs are padded to the 256 px the
flow network needs and cropped back).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .dcn import ModulatedDeformConv2d, modulated_deform_conv2d
from .registry import register_arch, register_model
from .spynet import SPyNet, flow_warp

BRANCHES = ("backward_1", "forward_1", "backward_2", "forward_2")


def _pick(flag: bool | torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a if flag else b`` for a Python bool, or elementwise for a tensor flag."""
    if isinstance(flag, bool):
        return a if flag else b
    return torch.where(flag, a, b)


def pad_frames(lqs: torch.Tensor, multiple: int, minimum: int) -> torch.Tensor:
    """Pad (N, T, 3, H, W) at the bottom/right so both sides are multiples of
    ``multiple`` and at least ``minimum`` (the flow network's smallest input);
    reflect where the image is large enough, else replicate."""
    h, w = lqs.shape[-2:]
    hp, wp = max(-(-h // multiple) * multiple, minimum), max(-(-w // multiple) * multiple, minimum)
    if (hp, wp) == (h, w):
        return lqs
    n, t = lqs.shape[:2]
    x = lqs.reshape(n * t, 3, h, w)
    mode = "reflect" if hp - h < h and wp - w < w else "replicate"
    x = F.pad(x, (0, wp - w, 0, hp - h), mode=mode)
    return x.reshape(n, t, 3, hp, wp)


class ResidualBlockNoBN(nn.Module):
    """conv-ReLU-conv with an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)

    def he_init(self) -> None:
        """He init scaled by 0.1, as MMEditing: the block starts near the identity."""
        for conv in (self.conv1, self.conv2):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            conv.weight.data.mul_(0.1)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class ResidualBlocksWithInputConv(nn.Module):
    """Input conv + LeakyReLU, then residual blocks (``main.2`` is the trunk)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int):
        super().__init__()
        self.main = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, 1, 1),
                                  nn.LeakyReLU(0.1, inplace=True),
                                  nn.Sequential(*[ResidualBlockNoBN(out_channels) for _ in range(num_blocks)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class PixelShufflePack(nn.Module):
    def __init__(self, cin: int, cout: int, scale: int):
        super().__init__()
        self.scale = scale
        self.upsample_conv = nn.Conv2d(cin, cout * scale * scale, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.upsample_conv(x)
        return F.pixel_shuffle(x, self.scale) if self.scale > 1 else x


class SecondOrderDeformableAlignment(ModulatedDeformConv2d):
    """Flow-guided deformable alignment of two propagated features: offsets are
    the flows plus a bounded residual (``max_residue_magnitude * tanh``)."""

    def __init__(self, in_channels: int, out_channels: int, deform_groups: int = 16,
                 max_residue_magnitude: float = 10.0):
        super().__init__(in_channels, out_channels, 3, padding=1, deform_groups=deform_groups)
        self.max_residue_magnitude = max_residue_magnitude
        c = out_channels
        self.conv_offset = nn.Sequential(
            nn.Conv2d(3 * c + 4, c, 3, 1, 1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(c, c, 3, 1, 1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(c, 27 * deform_groups, 3, 1, 1))
        nn.init.zeros_(self.conv_offset[-1].weight)
        nn.init.zeros_(self.conv_offset[-1].bias)

    def forward(self, x: torch.Tensor, extra_feat: torch.Tensor, flow_1: torch.Tensor,
                flow_2: torch.Tensor) -> torch.Tensor:
        out = self.conv_offset(torch.cat([extra_feat, flow_1, flow_2], dim=1))
        o1, o2, mask = torch.chunk(out, 3, dim=1)
        offset = self.max_residue_magnitude * torch.tanh(torch.cat((o1, o2), dim=1))
        off1, off2 = torch.chunk(offset, 2, dim=1)
        reps = off1.size(1) // 2
        off1 = off1 + flow_1.flip(1).repeat(1, reps, 1, 1)
        off2 = off2 + flow_2.flip(1).repeat(1, reps, 1, 1)
        return modulated_deform_conv2d(x, torch.cat([off1, off2], dim=1), torch.sigmoid(mask), self.weight,
                                       self.bias, 1, 1, 1, 1, self.deform_groups, sampler=self.sampler)


@dataclass
class BasicVSRPPConfig:
    mid_channels: int = 64
    num_blocks: int = 7
    max_residue_magnitude: float = 10.0
    is_low_res_input: bool = True
    scale: int = 4
    num_reconstruction_blocks: int = 5
    pqf_propagation: bool = False
    pqf_period: int = 4
    #: the full-resolution head also sees the image the global residual adds
    #: (the input, or its bilinear upsampling); not in the published model
    head_sees_input: bool = False
    extra: dict = field(default_factory=dict)


@register_arch("basicvsrpp")
class BasicVSRPlusPlus(nn.Module):
    """Input (N, T, 3, H, W) in [0, 1] -> (N, T, 3, sH, sW).

    ``forward(lqs, pqfs=None)``: with ``pqf_propagation`` on, the second-order
    link of each branch goes to the nearest peak-quality frame at least two
    steps back in the propagation direction (its flow chained from the
    consecutive flows), falling back to the frame two steps back; ``pqfs`` is
    the list of PQF indices of the clip (default: every ``pqf_period``-th).
    """

    task = "vsr"
    min_flow_size = 64  # SPyNet's input side at least, as MMEditing asserts (inference)
    min_flow_size_train = 16  # training patches: SPyNet upsamples to 32 px itself; padding would only cost time

    def __init__(self, cfg: BasicVSRPPConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.mid_channels
        if not cfg.is_low_res_input and cfg.scale != 1:
            raise ValueError("same-size mode (is_low_res_input=False) has scale 1")
        if cfg.is_low_res_input and cfg.scale not in (2, 4):
            raise ValueError("low-res input mode supports scale 2 or 4")
        self.spynet = SPyNet()
        if cfg.is_low_res_input:
            self.feat_extract = ResidualBlocksWithInputConv(3, c, 5)
        else:
            self.feat_extract = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.LeakyReLU(0.1, inplace=True),
                                              nn.Conv2d(c, c, 3, 2, 1), nn.LeakyReLU(0.1, inplace=True),
                                              ResidualBlocksWithInputConv(c, c, 5))
        self.deform_align = nn.ModuleDict()
        self.backbone = nn.ModuleDict()
        for i, name in enumerate(BRANCHES):
            self.deform_align[name] = SecondOrderDeformableAlignment(2 * c, c, 16, cfg.max_residue_magnitude)
            self.backbone[name] = ResidualBlocksWithInputConv((2 + i) * c, c, cfg.num_blocks)
        self.reconstruction = ResidualBlocksWithInputConv(5 * c, c, cfg.num_reconstruction_blocks)
        up = cfg.scale * (1 if cfg.is_low_res_input else 4)  # feature -> output factor
        self.upsample1 = PixelShufflePack(c, c, 2)
        self.upsample2 = PixelShufflePack(c, 64, 2 if up == 4 else 1)
        # The published head sees only features from 1/4 size (same-size form); at
        # 32 channels our model learnt little beyond colour offsets through it
        # (docs/models.md, "Why the same-size stage 1 does not learn"). The
        # option hands it the full-resolution image too (3 more input channels).
        self.conv_hr = nn.Conv2d(64 + 3 * cfg.head_sees_input, 64, 3, 1, 1)
        self.conv_last = nn.Conv2d(64, 3, 3, 1, 1)

    def he_init(self) -> None:
        """He init (LeakyReLU 0.1) for the convolutions outside SPyNet, the offset
        heads and the residual blocks (recipes: ``model.he_init``). With
        PyTorch's default (about a third of the variance per layer) the signal
        entering ``conv_last`` is 1/8 of the trunk's, and the first Adam steps
        drove it to nothing: the same-size model then stayed at the identity
        (measured, docs/models.md). Not the constructor's default, so that
        random test models keep their near-identity outputs."""
        blocks = [b for b in self.modules() if isinstance(b, ResidualBlockNoBN)]
        for b in blocks:
            b.he_init()
        skip = {id(m) for b in blocks for m in b.modules()}
        skip |= {id(m) for m in self.spynet.modules()}
        skip |= {id(m) for a in self.modules() if isinstance(a, SecondOrderDeformableAlignment)
                 for m in a.conv_offset.modules()}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in skip:
                nn.init.kaiming_normal_(m.weight, a=0.1, nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)

    # -- configuration ------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict) -> BasicVSRPlusPlus:
        cfg = dict(cfg)
        if "scale" not in cfg:
            cfg["scale"] = 4 if cfg.get("is_low_res_input", True) else 1
        return cls(BasicVSRPPConfig(**cfg))

    def config(self) -> dict:
        return asdict(self.cfg)

    @property
    def scale(self) -> int:
        return self.cfg.scale

    @property
    def multiple(self) -> int:
        """Spatial sizes are padded to a multiple of this internally."""
        return 1 if self.cfg.is_low_res_input else 4

    def grow(self, num_blocks: int) -> None:
        """Append residual blocks to the end of the reconstruction trunk. The new
        blocks start as exact identities (second conv zeroed), so the output
        does not change at the moment of growth and training continues."""
        trunk = self.reconstruction.main[2]
        ref = next(self.parameters())
        for _ in range(num_blocks):
            blk = ResidualBlockNoBN(self.cfg.mid_channels).to(device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(blk.conv2.weight)
            nn.init.zeros_(blk.conv2.bias)
            trunk.append(blk)
        self.cfg.num_reconstruction_blocks += num_blocks

    # -- forward ------------------------------------------------------------
    def compile_units(self) -> list[nn.Module]:
        """The per-frame blocks that ``torch.compile`` should see as graphs. The
        recurrence over frames stays eager (a whole-model compile unrolls it and,
        in torch 2.13, crashed inductor's CPU code generation at SPyNet's 1x1
        pyramid level); so does SPyNet, no faster compiled level by level."""
        return [self.feat_extract, *self.backbone.values(), *(a.conv_offset for a in self.deform_align.values()),
                self.reconstruction, self.upsample1, self.upsample2, self.conv_hr, self.conv_last]

    def flow_frames(self, lqs: torch.Tensor) -> torch.Tensor:
        """The frames (N, T, C, h, w) SPyNet sees: the input, or for same-size
        output the input at 1/4 size (bicubic), where the features live."""
        if self.cfg.is_low_res_input:
            return lqs
        n, t, c, h, w = lqs.shape
        small = F.interpolate(lqs.reshape(-1, c, h, w), scale_factor=0.25, mode="bicubic")
        return small.reshape(n, t, c, h // 4, w // 4)

    def compute_flow(self, lqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, c, h, w = lqs.shape
        a = lqs[:, :-1].reshape(-1, c, h, w)
        b = lqs[:, 1:].reshape(-1, c, h, w)
        flows_backward = self.spynet(a, b).reshape(n, t - 1, 2, h, w)
        flows_forward = self.spynet(b, a).reshape(n, t - 1, 2, h, w)
        return flows_forward, flows_backward

    def _new_anchor(self, order: list[int], pqf: set[int] | torch.Tensor) -> list[bool | torch.Tensor]:
        """For each step of a propagation order: does the second-order link move
        to the step two back? With PQF propagation it stays on the latest PQF at
        least two steps back and only moves when a newer one becomes eligible
        (or while none has been seen). ``pqf`` is a set of indices or a (T,)
        0/1 tensor; the tensor form keeps the choice inside an exported graph."""
        t = len(order)
        flags: list[bool | torch.Tensor] = [True] * t
        if not self.cfg.pqf_propagation or t < 3:
            return flags
        if isinstance(pqf, torch.Tensor):
            m = pqf.reshape(-1)[order] > 0.5
            never = torch.cumsum(m.to(torch.int32), 0) == 0
            return flags[:2] + [m[i - 2] | never[i - 2] for i in range(2, t)]
        seen = False
        for i in range(2, t):
            is_pqf = order[i - 2] in pqf
            flags[i] = is_pqf or not seen
            seen = seen or is_pqf
        return flags

    def propagate(self, spatial: list[torch.Tensor], done: list[list[torch.Tensor]], flows: torch.Tensor,
                  name: str, pqf: set[int] | torch.Tensor) -> list[torch.Tensor]:
        t = len(spatial)
        backward = name.startswith("backward")
        order = list(range(t - 1, -1, -1)) if backward else list(range(t))
        new_anchor = self._new_anchor(order, pqf)
        outs: list[torch.Tensor | None] = [None] * t
        history: list[torch.Tensor] = []
        prev_flow1: torch.Tensor | None = None
        chain: torch.Tensor | None = None  # flow from the anchor step to the previous step
        anchor_feat: torch.Tensor | None = None
        feat_prop = spatial[0].new_zeros(spatial[0].shape)
        align = self.deform_align[name]
        for i, idx in enumerate(order):
            cur = spatial[idx]
            if i > 0:
                flow1 = flows[:, idx] if backward else flows[:, idx - 1]
                cond1 = flow_warp(feat_prop, flow1)
                if i > 1:
                    # The anchor either stays (extend its chained flow by one
                    # step) or moves to step i-2 (restart from the last flow).
                    new = new_anchor[i]
                    base = prev_flow1 if chain is None else _pick(new, prev_flow1, chain)
                    anchor_feat = history[i - 2] if anchor_feat is None else _pick(new, history[i - 2], anchor_feat)
                    flow2 = flow1 + flow_warp(base, flow1)
                    chain, feat2 = flow2, anchor_feat
                    cond2 = flow_warp(feat2, flow2)
                else:
                    feat2 = torch.zeros_like(feat_prop)
                    flow2 = torch.zeros_like(flow1)
                    cond2 = torch.zeros_like(cond1)
                feat_prop = align(torch.cat([feat_prop, feat2], 1), torch.cat([cond1, cur, cond2], 1), flow1, flow2)
                prev_flow1 = flow1
            feat = torch.cat([cur] + [d[idx] for d in done] + [feat_prop], dim=1)
            feat_prop = feat_prop + self.backbone[name](feat)
            history.append(feat_prop)
            outs[idx] = feat_prop
        return outs  # type: ignore[return-value]

    def pad_sizes(self, training: bool = False) -> tuple[int, int]:
        """(multiple, minimum) that input sides are padded to before the network.
        For training (``forward`` in train mode with gradients) the minimum is
        lower, so that 64 px patches (the batch diversity small models need)
        are not padded to 256 px; exports and inference keep MMEditing's."""
        least = self.min_flow_size_train if training else self.min_flow_size
        if self.cfg.is_low_res_input:
            return 1, least
        return 4, 4 * least

    def forward(self, lqs: torch.Tensor, pqfs: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """``pqfs``: PQF indices of the clip, or a (T,) 0/1 mask tensor."""
        if lqs.dim() != 5 or lqs.shape[2] != 3:
            raise ValueError(f"expected (N, T, 3, H, W), got {tuple(lqs.shape)}")
        h0, w0 = lqs.shape[-2:]
        lqs = pad_frames(lqs, *self.pad_sizes(self.training and torch.is_grad_enabled()))
        if lqs.shape[1] < 2:  # a single frame: propagate over itself so every branch sees valid flow
            out = self.forward_padded(lqs.repeat(1, 2, 1, 1, 1), [0, 1])[:, :1]
        else:
            out = self.forward_padded(lqs, pqfs)
        return out[..., : h0 * self.scale, : w0 * self.scale]

    def forward_padded(self, lqs: torch.Tensor, pqfs: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """The network on frames already padded by ``pad_frames`` (T >= 2);
        free of size-dependent Python branches, so it traces for export."""
        n, t, c, h, w = lqs.shape
        if pqfs is None:
            pqf: set[int] | torch.Tensor = set(range(0, t, self.cfg.pqf_period))
        else:
            pqf = pqfs if isinstance(pqfs, torch.Tensor) else set(pqfs)
        lqs_flow = self.flow_frames(lqs)
        feats = self.feat_extract(lqs.reshape(-1, c, h, w))
        feats = feats.reshape(n, t, -1, *feats.shape[-2:])
        spatial = [feats[:, i] for i in range(t)]
        flows_forward, flows_backward = self.compute_flow(lqs_flow)
        done: list[list[torch.Tensor]] = []
        for name in BRANCHES:
            flows = flows_backward if name.startswith("backward") else flows_forward
            done.append(self.propagate(spatial, done, flows, name, pqf))
        outputs = []
        for i in range(t):
            hr = torch.cat([spatial[i]] + [d[i] for d in done], dim=1)
            outputs.append(self.reconstruct(hr, lqs[:, i]))
        return torch.stack(outputs, dim=1)

    def reconstruct(self, hr: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        if self.cfg.is_low_res_input:
            base = F.interpolate(lq, scale_factor=self.scale, mode="bilinear", align_corners=False)
        else:
            base = lq
        hr = self.reconstruction(hr)
        # In place: the head's tensors are the model's largest (64 channels at the output size: 265 MB each in
        # bfloat16 for a 1920x1080 frame), and a fresh one costs more to allocate than the activation itself.
        hr = F.leaky_relu_(self.upsample1(hr), 0.1)
        hr = F.leaky_relu_(self.upsample2(hr), 0.1)
        if self.cfg.head_sees_input:
            hr = torch.cat([hr, base.to(hr.dtype)], 1)
        hr = F.leaky_relu_(self.conv_hr(hr), 0.1)
        hr = self.conv_last(hr)
        return hr + base


register_model("basicvsrpp_c64n7_x4", "basicvsrpp", mid_channels=64, num_blocks=7, is_low_res_input=True, scale=4)
register_model("basicvsrpp_c64n7_x2", "basicvsrpp", mid_channels=64, num_blocks=7, is_low_res_input=True, scale=2)
register_model("basicvsrpp_c64n7_x1", "basicvsrpp", mid_channels=64, num_blocks=7, is_low_res_input=False,
               scale=1)
register_model("basicvsrpp_c128n25_x1", "basicvsrpp", mid_channels=128, num_blocks=25, is_low_res_input=False,
               scale=1)
register_model("basicvsrpp_c128n25_x1_pqf", "basicvsrpp", mid_channels=128, num_blocks=25,
               is_low_res_input=False, scale=1, pqf_propagation=True)
register_model("basicvsrpp_c128n25_x4_pqf", "basicvsrpp", mid_channels=128, num_blocks=25,
               is_low_res_input=True, scale=4, pqf_propagation=True)
register_model("basicvsrpp_c32n4_x1_pqf", "basicvsrpp", mid_channels=32, num_blocks=4, is_low_res_input=False,
               scale=1, pqf_propagation=True)
register_model("basicvsrpp_c32n4_x4_pqf", "basicvsrpp", mid_channels=32, num_blocks=4, is_low_res_input=True,
               scale=4, pqf_propagation=True)
register_model("basicvsrpp_c32n4_x1_pqf_hi", "basicvsrpp", mid_channels=32, num_blocks=4, is_low_res_input=False,
               scale=1, pqf_propagation=True, head_sees_input=True)
register_model("basicvsrpp_c16n2_x1", "basicvsrpp", mid_channels=16, num_blocks=2, is_low_res_input=False,
               scale=1)
register_model("basicvsrpp_c16n2_x4", "basicvsrpp", mid_channels=16, num_blocks=2, is_low_res_input=True, scale=4)
