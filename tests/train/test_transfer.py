import json

import pytest
import torch
from omegaconf import OmegaConf

from vrestore.errors import VrestoreError
from vrestore.models import build, save
from vrestore.train.engine import Trainer
from vrestore.train.transfer import transfer


def _swin(heads: int, seed: int = 0, **cfg) -> torch.nn.Module:
    """A random SwinIR-T whose attention is peaked: with the default small
    initialisation every window attends almost uniformly, and a wrong query
    scale or head grouping would go unnoticed."""
    torch.manual_seed(seed)
    model = build("swinir_t_color_dn", num_heads=[heads, heads], **cfg).eval()
    for m in model.modules():
        if hasattr(m, "relative_position_bias_table"):
            with torch.no_grad():
                m.qkv.weight[: 2 * m.qkv.in_features] *= 20
                m.relative_position_bias_table *= 50
    return model


def _tie_groups(model: torch.nn.Module, group: int) -> None:
    """Give the heads of each group equal queries, keys and position biases
    (values stay different): such heads attend alike, so merging them changes
    nothing and the merged model must reproduce the original."""
    for m in model.modules():
        if hasattr(m, "relative_position_bias_table"):
            c, hd = m.qkv.in_features, m.qkv.in_features // m.num_heads
            with torch.no_grad():
                for part in (0, 1):  # q, k
                    for h in range(m.num_heads):
                        first = part * c + (h // group) * group * hd
                        rows = slice(part * c + h * hd, part * c + (h + 1) * hd)
                        m.qkv.weight[rows] = m.qkv.weight[first: first + hd]
                        m.qkv.bias[rows] = m.qkv.bias[first: first + hd]
                t = m.relative_position_bias_table
                t.copy_(t[:, ::group].repeat_interleave(group, dim=1))


@pytest.mark.parametrize("heads", [4, 2, 1])
def test_merging_heads_that_attend_alike_reproduces_the_model(heads):
    src = _swin(4)
    _tie_groups(src, 4 // heads)
    dst = _swin(heads, seed=1)
    counts = transfer(dst, src)
    assert counts["merged_attentions"] == (0 if heads == 4 else 4) and counts["unused"] == 0
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        a, b = src(x), dst(x)
    assert (a - x).abs().mean() > 1e-3  # the network does something, so equality means something
    torch.testing.assert_close(b, a, atol=2e-5, rtol=0)


def test_merging_heads_is_an_approximation_otherwise():
    src, dst = _swin(4), _swin(2, seed=1)
    transfer(dst, src)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        a, b = src(x), dst(x)
    assert (a - b).abs().max() > 1e-3  # 50x the tolerance the tied heads meet


def test_transfer_refuses_what_it_cannot_carry():
    with pytest.raises(VrestoreError, match="merge 4 heads .* into 3"):
        transfer(build("swinir_t_color_dn", embed_dim=24, num_heads=[3, 3]), _swin(4, embed_dim=24))
    with pytest.raises(VrestoreError, match="no counterpart"):
        transfer(build("swinir_e24_color_dn"), _swin(2))


@pytest.mark.parametrize("resi", ["1conv", "3conv"])
def test_a_new_residual_group_starts_as_the_identity_and_learns(resi):
    src = _swin(2, resi_connection=resi)
    torch.manual_seed(1)
    dst = build("swinir_t2_g3_color_dn", resi_connection=resi)
    counts = transfer(dst, src)
    assert counts["identity_groups"] == 1 and counts["unused"] == 0
    assert counts["copied"] == len(src.state_dict())  # every source tensor, and nothing counted twice
    x = torch.rand(1, 3, 24, 40)
    with torch.no_grad():
        a, b = src(x), dst(x)
    assert (a - x).abs().mean() > 1e-3
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)  # exactly the source model
    new_block = dst.layers[2].residual_group.blocks[0].attn.qkv.weight
    assert new_block.abs().sum() > 0  # fresh weights, not zeros: the group can learn once its conv moves
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    for _ in range(2):  # the first step moves the zero conv, the second reaches the blocks behind it
        opt.zero_grad()
        (dst(x) - x.flip(-1)).square().mean().backward()
        opt.step()
    assert new_block.grad.abs().sum() > 0


def test_recipe_transfer_builds_the_named_model_from_the_file(tmp_path):
    src = _swin(4)
    _tie_groups(src, 2)
    path = save(src, tmp_path / "four_heads.safetensors")
    cfg = OmegaConf.create({
        "name": "t", "out": str(tmp_path / "run"), "device": "cpu", "dtype": "fp32",
        "model": {"name": "swinir_t2_color_dn", "transfer": str(path)},
        "data": {"train": str(tmp_path), "patch": 32, "batch": 2}, "steps": [{"iters": 1}]})
    tr = Trainer(cfg)
    assert tr.model.config()["num_heads"] == [2, 2]
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(tr.model.eval()(x), src(x), atol=2e-5, rtol=1e-4)
    tr.close()
    for key, value, msg in (("init", str(path), "exclude each other"), ("zero_last", True, "no effect"),
                            ("name", None, "needs model.name")):
        bad = cfg.copy()
        bad.model[key] = value
        with pytest.raises(VrestoreError, match=msg):
            Trainer(bad)


def test_a_recipe_grows_depth_by_list_overrides_and_checkpoints(tmp_path):
    """``model.depths`` given in a recipe: the run's checkpoint (its JSON
    config) records the grown network, which starts as the source."""
    src = _swin(2)
    path = save(src, tmp_path / "two_groups.safetensors")
    cfg = OmegaConf.create({
        "name": "t", "out": str(tmp_path / "run"), "device": "cpu", "dtype": "fp32",
        "model": {"name": "swinir_t2_color_dn", "depths": [2, 2, 2], "num_heads": [2, 2, 2], "transfer": str(path)},
        "data": {"train": str(tmp_path), "patch": 32, "batch": 2}, "steps": [{"iters": 1}]})
    tr = Trainer(cfg)
    ck = torch.load(tr.save_checkpoint(), map_location="cpu", weights_only=True)
    assert json.loads(ck["model_config"])["depths"] == [2, 2, 2]
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(tr.model.eval()(x), src(x), atol=1e-6, rtol=0)
    tr.close()
