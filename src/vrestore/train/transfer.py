"""Start a model from another one's weights when their configs differ only in
ways the weights can be carried across: equal tensors are copied, a Swin
attention with fewer heads takes the mean of each group of heads (fewer heads
run faster on a CPU, ``docs/models.md``), and residual Swin groups that the
source lacks start as the identity (a deeper model that begins exactly where
the trained one is). Used by the trainer's ``model.transfer`` key; the new
model is then fine-tuned."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import VrestoreError
from ..models.swinir import RSTB, WindowAttention


def _merge_heads(d_att: WindowAttention, s_att: WindowAttention, name: str, out: dict[str, torch.Tensor]) -> bool:
    """Fill ``name.qkv`` and ``name.relative_position_bias_table`` of a window
    attention with ``h`` heads from one with ``g * h`` heads: each new head's
    attention logit is the mean of its group's logits (queries scaled by
    ``1 / sqrt(g)``, position biases averaged), values and projection kept."""
    h, hs = d_att.num_heads, s_att.num_heads
    if hs % h or d_att.qkv.weight.shape != s_att.qkv.weight.shape:
        return False
    g = hs // h
    c = s_att.qkv.weight.shape[1]
    # SDPA scales logits by 1/sqrt(head dim): the merged head's dim is g times larger,
    # so q * sqrt(g) / g gives the mean of the g old logits.
    q_scale = math.sqrt(g) / g
    w, b = s_att.qkv.weight.detach().clone(), s_att.qkv.bias.detach().clone()
    w[:c] *= q_scale
    b[:c] *= q_scale
    out[f"{name}.qkv.weight"], out[f"{name}.qkv.bias"] = w, b
    table = s_att.relative_position_bias_table.detach()
    out[f"{name}.relative_position_bias_table"] = table.view(table.shape[0], h, g).mean(-1)
    return True


def _new_groups(dst: nn.Module, src_sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Fill every residual Swin group of ``dst`` that has no tensor in
    ``src_sd`` so that it passes its input through unchanged: its blocks keep
    their fresh initialisation and its closing convolution (the last one, for
    ``3conv``) is zero, so ``x + conv(blocks(x)) = x`` until training moves
    that convolution. Returns how many groups and tensors were filled."""
    added = filled = 0
    for name, module in dst.named_modules():
        if not isinstance(module, RSTB) or any(k.startswith(f"{name}.") for k in src_sd):
            continue
        sd = module.state_dict()
        last = "conv" if isinstance(module.conv, nn.Conv2d) else f"conv.{len(module.conv) - 1}"
        for k, v in sd.items():
            out[f"{name}.{k}"] = torch.zeros_like(v) if k.startswith(f"{last}.") else v.detach().clone()
        added, filled = added + 1, filled + len(sd)
    return added, filled


def transfer(dst: nn.Module, src: nn.Module) -> dict[str, int]:
    """Load ``src``'s weights into ``dst`` (in place). Every tensor of ``dst``
    must be covered, by an equal-shaped tensor of the same name, a head merge
    or a residual group that ``src`` lacks entirely (started as the identity);
    anything else is an error naming the tensors, so that a recipe never
    trains from a half-random start by accident. Returns counts for the log."""
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    new: dict[str, torch.Tensor] = {}
    added, fresh = _new_groups(dst, src_sd, new)
    merged = 0
    for name, module in dst.named_modules():
        key = f"{name}.relative_position_bias_table"
        if isinstance(module, WindowAttention) and key in src_sd and src_sd[key].shape != dst_sd[key].shape:
            s_att = src.get_submodule(name)
            if not _merge_heads(module, s_att, name, new):
                raise VrestoreError(f"transfer: cannot merge {s_att.num_heads} heads of {name} into {module.num_heads}")
            merged += 1
    for k, v in dst_sd.items():
        if k in new:
            continue
        if k in src_sd and src_sd[k].shape == v.shape:
            new[k] = src_sd[k]
    left = [k for k in dst_sd if k not in new]
    if left:
        raise VrestoreError(f"transfer: {len(left)} tensors of the new model have no counterpart of that shape "
                            f"(e.g. {left[0]}); give model.init for an identical architecture instead")
    dst.load_state_dict(new)  # copies into dst's own tensors, in their dtype
    return {"copied": len(new) - fresh, "merged_attentions": merged, "identity_groups": added,
            "unused": sum(k not in dst_sd for k in src_sd)}
