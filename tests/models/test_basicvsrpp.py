import json

import numpy as np
import pytest
import torch

import vrestore
from vrestore.errors import VrestoreError
from vrestore.models import build
from vrestore.models.basicvsrpp import BasicVSRPlusPlus


@pytest.mark.parametrize("sampler", ["auto", "grid_sample"])
@pytest.mark.parametrize("name", ["basicvsrpp_c16n2_x4", "basicvsrpp_c16n2_x1"])
def test_reference_vectors(reference_dir, name, sampler, monkeypatch):
    """Through both DCN samplers: ``auto`` is the compiled gather one for CPU inference (``restore --compile``)."""
    monkeypatch.setenv("VRESTORE_DCN_SAMPLER", sampler)
    model = vrestore.load(reference_dir / f"{name}.pth")
    io = np.load(reference_dir / f"{name}_io.npz")
    manifest = json.loads((reference_dir / "MANIFEST.json").read_text())[name]["constructor"]
    assert model.cfg.mid_channels == manifest["mid_channels"]
    assert model.cfg.num_blocks == manifest["num_blocks"]
    assert model.cfg.is_low_res_input == manifest["is_low_res_input"]
    with torch.no_grad():
        out = model(torch.from_numpy(io["input"]))
    assert out.shape == io["output"].shape
    assert float((out - torch.from_numpy(io["output"])).abs().max()) < 1e-4


@pytest.mark.parametrize("layout", ["basicvsrpp_c64n7_x4", "basicvsrpp_c128n25_x1"])
def test_full_size_published_layouts_load(reference_dir, tmp_path, layout):
    spec = json.loads((reference_dir / "checkpoint_layouts.json").read_text())[layout]
    g = torch.Generator().manual_seed(0)
    sd = {f"generator.{k}": torch.randn(*shape, generator=g) * 0.01
          for k, shape in {**spec["parameters"], **spec["buffers"]}.items()}
    path = tmp_path / f"{layout}.pth"
    torch.save({"state_dict": sd, "meta": {}}, path)
    model = vrestore.load(path)
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    cons = spec["constructor"]
    assert (model.cfg.mid_channels, model.cfg.num_blocks, model.cfg.is_low_res_input) == \
        (cons["mid_channels"], cons["num_blocks"], cons["is_low_res_input"])
    x = torch.rand(1, 2, 3, 32, 32) if cons["is_low_res_input"] else torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    assert y.shape[-1] == x.shape[-1] * model.scale and torch.isfinite(y).all()


def _randomised(name, **kw):
    torch.manual_seed(0)
    m = build(name, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


def test_pqf_propagation_links_to_peak_quality_frames():
    m = _randomised("basicvsrpp_c16n2_x1", pqf_propagation=True)

    def anchors(order, pqf):  # the step each second-order link comes from, per step from 2 on
        out = []
        for i, new in enumerate(m._new_anchor(order, pqf)[2:], start=2):
            out.append(i - 2 if bool(new) else out[-1])
        return [order[a] for a in out]

    order = list(range(10))
    mask = torch.tensor([1.0 if i in (0, 4, 8) else 0.0 for i in order])
    assert anchors(order, {0, 4, 8}) == anchors(order, mask) == [0, 0, 0, 0, 4, 4, 4, 4]
    # Backward: frames 9, 8, ...; the nearest PQF at least two steps back, else the frame two steps back.
    back = order[::-1]
    assert anchors(back, {0, 4, 8}) == anchors(back, mask) == [9, 8, 8, 8, 8, 4, 4, 4]
    x = torch.rand(1, 9, 3, 64, 64)
    with torch.no_grad():
        pqf = m(x, pqfs=[0, 4, 8])
        none = m(x, pqfs=[])  # no PQF known: plain second-order propagation
    m.cfg.pqf_propagation = False
    with torch.no_grad():
        plain = m(x)
    assert torch.allclose(none, plain, atol=1e-6)
    assert float((pqf - plain).abs().max()) > 1e-4
    m.cfg.pqf_propagation = True
    with torch.no_grad():  # the mask form (used inside exported graphs) is the same network
        as_mask = m.forward(x, pqfs=torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 1]))
    assert torch.equal(as_mask, pqf)


def test_growth_keeps_output_and_trains_new_blocks():
    m = _randomised("basicvsrpp_c16n2_x1")
    x = torch.rand(1, 3, 3, 64, 64)
    with torch.no_grad():
        before = m(x)
    m.grow(5)
    assert len(m.reconstruction.main[2]) == 10 and m.cfg.num_reconstruction_blocks == 10
    with torch.no_grad():
        after = m(x)
    assert torch.equal(before, after)
    m.train()
    m(x).mean().backward()
    new = m.reconstruction.main[2][-1]
    assert new.conv2.weight.grad is not None and float(new.conv2.weight.grad.abs().sum()) > 0
    reloaded = BasicVSRPlusPlus.from_config(m.config())
    reloaded.load_state_dict(m.state_dict())


@pytest.mark.parametrize("name,size,scale", [("basicvsrpp_c16n2_x1", (52, 70), 1),
                                             ("basicvsrpp_c16n2_x4", (20, 30), 4),
                                             ("basicvsrpp_c16n2_x4", (70, 66), 4)])
def test_input_modes_pad_and_crop(name, size, scale):
    m = _randomised(name)
    x = torch.rand(1, 3, 3, *size)
    with torch.no_grad():
        y = m(x)
        single = m(x[:, :1])
    assert y.shape == (1, 3, 3, size[0] * scale, size[1] * scale)
    assert single.shape == (1, 1, 3, size[0] * scale, size[1] * scale)


def test_x2_variant_builds_and_round_trips(tmp_path):
    m = _randomised("basicvsrpp_c16n2_x4", scale=2)
    x = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
    assert y.shape[-1] == 128
    vrestore.models.save(m, tmp_path / "x2.safetensors")
    m2 = vrestore.load(tmp_path / "x2.safetensors")
    with torch.no_grad():
        assert torch.equal(m2(x), y)


def test_mismatched_checkpoint_is_explained(tmp_path):
    m = build("basicvsrpp_c16n2_x1")
    sd = {f"generator.{k}": v for k, v in m.state_dict().items() if "reconstruction" not in k}
    torch.save({"state_dict": sd}, tmp_path / "broken.pth")
    with pytest.raises(VrestoreError, match="reconstruction|missing"):
        vrestore.load(tmp_path / "broken.pth")


@pytest.mark.parametrize("name", ["basicvsrpp_c32n4_x1_pqf", "basicvsrpp_c16n2_x4"])
def test_fresh_network_carries_its_signal_to_the_output_head(name):
    """Untrained and He-initialised (recipes' ``model.he_init``), the features
    entering ``conv_last`` are as large as the trunk's: with PyTorch's default
    init they are about 1/8, and the same-size model never left the identity
    in training."""
    torch.manual_seed(0)
    m = build(name, pqf_propagation=True).eval()
    m.he_init()
    seen: dict[str, float] = {}
    m.reconstruction.register_forward_hook(lambda mod, i, o: seen.update(trunk=float(o.abs().mean())))
    m.conv_last.register_forward_hook(lambda mod, i, o: seen.update(head=float(i[0].abs().mean())))
    with torch.no_grad():
        m(torch.rand(1, 2, 3, 64, 64))
    assert seen["head"] > 0.5 * seen["trunk"], seen
    blk = m.reconstruction.main[2][0]
    assert float(blk.conv2.weight.std()) < 0.3 * float(m.conv_hr.weight.std())  # residual blocks start near identity


def test_training_mode_pads_patches_less_than_inference():
    """Inference pads same-size inputs to 256 px (SPyNet sees 64, as MMEditing
    asserts); training takes 64 px patches as they are."""
    m = build("basicvsrpp_c16n2_x1").train()
    assert m.pad_sizes() == (4, 256)
    assert m.pad_sizes(training=True) == (4, 64)
    y = m(torch.rand(2, 3, 3, 64, 64))
    assert y.shape == (2, 3, 3, 64, 64)


@pytest.mark.parametrize("name,scale", [("basicvsrpp_c32n4_x1_pqf_hi", 1), ("basicvsrpp_c16n2_x4", 4)])
def test_head_that_sees_the_input_gets_it_at_full_resolution(name, scale, tmp_path):
    """``head_sees_input``: conv_hr's last three input channels are the image the
    global residual adds (the input, or its bilinear x4), aligned pixel for
    pixel. With the feature channels of conv_hr zeroed, the output must be
    exactly that image run through conv_hr and conv_last; and the option
    survives a save and load."""
    torch.manual_seed(0)
    m = build(name, head_sees_input=True).eval()
    assert m.conv_hr.in_channels == 64 + 3
    with torch.no_grad():
        m.conv_hr.weight[:, :64].zero_()
        for p in (m.conv_hr.weight, m.conv_hr.bias, m.conv_last.weight, m.conv_last.bias):
            p.mul_(3.0)  # make the head's contribution large
    x = torch.rand(1, 3, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        frames = x[0]
        base = frames if scale == 1 else torch.nn.functional.interpolate(frames, scale_factor=scale, mode="bilinear")
        head = m.conv_last(torch.nn.functional.leaky_relu(
            torch.nn.functional.conv2d(base, m.conv_hr.weight[:, 64:], m.conv_hr.bias, padding=1), 0.1))
    assert float(head.abs().mean()) > 0.05
    # two 3x3 convs in from the border (the network pads small inputs, the reference with zeros)
    torch.testing.assert_close(y[0][..., 2:-2, 2:-2], (head + base)[..., 2:-2, 2:-2], rtol=1e-4, atol=1e-4)
    vrestore.models.save(m, tmp_path / "hi.safetensors")
    m2 = vrestore.load(tmp_path / "hi.safetensors")
    assert m2.cfg.head_sees_input
    with torch.no_grad():
        assert torch.equal(m2(x), y)


def test_published_head_is_unchanged_by_default():
    m = build("basicvsrpp_c32n4_x1_pqf")
    assert not m.cfg.head_sees_input and m.conv_hr.in_channels == 64


@pytest.mark.parametrize("head", [False, True])
def test_weights_alone_tell_the_head(head):
    """A checkpoint without our config (an MMEditing-style state dict) still
    loads into the right head: the option is read off conv_hr's input width."""
    from vrestore.models.checkpoint import infer_basicvsrpp_config

    m = build("basicvsrpp_c16n2_x1", head_sees_input=head)
    assert infer_basicvsrpp_config(m.state_dict())["head_sees_input"] is head
