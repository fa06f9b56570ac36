"""ONNX export of both stages and the onnxruntime backend, at tiny size."""

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vrestore.cli import app  # noqa: E402
from vrestore.errors import VrestoreError  # noqa: E402
from vrestore.export.onnx import ensure_onnx, export_onnx  # noqa: E402
from vrestore.infer.onnx_backend import OnnxModel, _mirror  # noqa: E402
from vrestore.infer.restorer import Restorer  # noqa: E402
from vrestore.models import save  # noqa: E402
from vrestore.video.io import VideoReader, VideoWriter  # noqa: E402


def _clip(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255).unsqueeze(0)


@pytest.mark.parametrize("name,kw", [("basicvsrpp_c16n2_x1", {}), ("basicvsrpp_c16n2_x4", {}),
                                     ("basicvsrpp_c16n2_x1", {"head_sees_input": True})])
def test_stage1_export_matches_torch_on_a_real_chunk(tmp_path, small_frames, name, kw, random_model):
    m = random_model(name, pqf_propagation=True, **kw)
    path = tmp_path / "s1.onnx"
    meta = export_onnx(m, path, frames=4)
    assert meta["vrestore_role"] == "stage1" and meta["vrestore_frames"] == "4"
    props = {p.key: p.value for p in __import__("onnx").load(str(path)).metadata_props}
    assert props["vrestore_pqf_propagation"] == "1" and props["vrestore_scale"] == str(m.scale)
    o = OnnxModel(path)
    # A real chunk, at a size other than the one traced (and not a multiple of 4).
    x = _clip(small_frames[:4, :62, :90] if m.scale == 1 else small_frames[:4, :30, :42])
    with torch.no_grad():
        want = m(x, pqfs=[0, 3])
        got = o(x, [0, 3])
    assert got.shape == want.shape
    assert float((got - want).abs().max()) < 1e-3
    # The PQF list reaches the graph: another list gives another (torch-equal) answer.
    with torch.no_grad():
        other, other_torch = o(x, [1]), m(x, pqfs=[1])
    assert float((other - got).abs().max()) > 1e-5
    assert float((other - other_torch).abs().max()) < 1e-3


@pytest.mark.parametrize("name,kw", [("swinir_e24_color_dn", {}),
                                     ("swinir_e24_color_dn", {"upscale": 2, "upsampler": "pixelshuffledirect"})])
def test_stage2_export_matches_torch_at_any_size(tmp_path, small_frames, name, kw, random_model):
    m = random_model(name, **kw)
    path = tmp_path / "s2.onnx"
    export_onnx(m, path)
    o = OnnxModel(path)
    for h, w in [(45, 61), (64, 40)]:
        x = _clip(small_frames[:1, :h, :w])[0]
        with torch.no_grad():
            assert float((o(x) - m(x)).abs().max()) < 1e-3


class Erfinv(nn.Module):
    def forward(self, x):
        return torch.special.erfinv(x.clamp(-0.5, 0.5))


def test_unexportable_layer_is_named_and_no_file_is_left(tmp_path, random_model):
    m = random_model("swinir_e24_color_dn")
    mlp = m.layers[0].residual_group.blocks[1].mlp
    mlp.fc1 = nn.Sequential(mlp.fc1, Erfinv())
    path = tmp_path / "bad.onnx"
    with pytest.raises(VrestoreError, match=r"layers\.0\.residual_group\.blocks\.1\.mlp\.fc1\.1 \(Erfinv\)"):
        export_onnx(m, path)
    assert list(tmp_path.iterdir()) == []


def test_non_vrestore_onnx_and_too_long_chunks_are_refused(tmp_path, random_model):
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(nn.Conv2d(3, 3, 1), (torch.rand(1, 3, 4, 4),), str(plain), dynamo=False)
    with pytest.raises(VrestoreError, match="not a vrestore export"):
        OnnxModel(plain)
    path = tmp_path / "s1.onnx"
    export_onnx(random_model("basicvsrpp_c16n2_x4"), path, frames=3)
    with pytest.raises(VrestoreError, match="exported for 3 frames"):
        OnnxModel(path)(torch.rand(1, 5, 3, 16, 16))


def test_mirror_fills_short_clips_in_time():
    assert _mirror(3, 7) == [0, 1, 2, 1, 0, 1, 2]
    assert _mirror(1, 3) == [0, 0, 0]
    assert _mirror(4, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("mode", ["tta", "stage2_ensemble_tta4"])
def test_onnxruntime_restorer_streams_like_torch(tmp_path, small_frames, random_model, mode):
    """Chunks, blending, TTA and stage 2 around exported graphs give the torch result; so do a stage-2
    ensemble and stage-2 TTA with quarter turns (the exported stage 2 takes the frame transposed, W x H)."""
    s1 = random_model("basicvsrpp_c16n2_x1", pqf_propagation=True)
    s2 = [random_model("swinir_e24_color_dn", seed=1)]
    export_onnx(s1, tmp_path / "s1.onnx", frames=4)
    kw = dict(device="cpu", dtype="fp32", chunk=4, overlap=2)
    if mode == "tta":
        kw["tta"] = True
    else:
        s2.append(random_model("swinir_e24_color_dn", seed=2))
        kw["stage2_tta"] = 4
    onnx2 = [str(tmp_path / f"s2_{i}.onnx") for i in range(len(s2))]
    for m, path in zip(s2, onnx2, strict=True):
        export_onnx(m, path)
    frames = small_frames[:6, :40, :56]  # two windows, blended over 2 frames
    want = Restorer(s1, s2, **kw).restore_frames(frames, pqfs=[0, 4])
    r = Restorer(str(tmp_path / "s1.onnx"), onnx2, backend="onnxruntime", **kw)
    assert r.engine.startswith("onnxruntime") and r.chunk == 4
    assert len(r.stage2s) == len(s2) and len(r.stage2_transforms) == (4 if mode != "tta" else 1)
    got = r.restore_frames(frames, pqfs=[0, 4])
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_onnx_file_needs_the_onnxruntime_backend(tmp_path, random_model):
    path = tmp_path / "s2.onnx"
    export_onnx(random_model("swinir_e24_color_dn"), path)
    with pytest.raises(VrestoreError, match="needs --backend onnxruntime"):
        Restorer(random_model("basicvsrpp_c16n2_x4"), str(path), backend="torch")


def test_checkpoints_are_exported_once_into_the_cache(tmp_path, monkeypatch, random_model):
    monkeypatch.setenv("VRESTORE_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "m.safetensors"
    save(random_model("basicvsrpp_c16n2_x4"), ckpt)
    first = ensure_onnx(ckpt, frames=3)
    stamp = first.stat().st_mtime_ns
    assert ensure_onnx(ckpt, frames=3) == first and first.stat().st_mtime_ns == stamp
    assert OnnxModel(first).frames == 3


def test_cli_export_then_restore_with_onnxruntime(tmp_path, small_frames, random_model):
    runner = CliRunner()
    ckpt = tmp_path / "m.safetensors"
    save(random_model("basicvsrpp_c16n2_x4"), ckpt)
    src = tmp_path / "in.mp4"
    with VideoWriter(src, codec="x264", fps=25) as w:
        for f in small_frames[:7, :32, :48]:
            w.write(np.ascontiguousarray(f))
    onnx_path = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", str(ckpt), "-o", str(onnx_path), "--frames", "4"])
    assert r.exit_code == 0, r.output
    assert "stage1" in r.output and onnx_path.exists()
    r = runner.invoke(app, ["export", str(ckpt), "-o", str(onnx_path)])
    assert r.exit_code == 2 and "exists" in r.output
    outs = {}
    for backend, model in [("onnxruntime", onnx_path), ("torch", ckpt)]:
        dst = tmp_path / f"out_{backend}.mkv"
        r = runner.invoke(app, ["restore", str(src), "-o", str(dst), "--model", str(model), "--backend", backend,
                                "--chunk", "4", "--overlap", "2", "--dtype", "fp32", "--pqf", "none"])
        assert r.exit_code == 0, r.output
        outs[backend] = np.stack([f.rgb for f in VideoReader(dst)])
    assert outs["torch"].shape == outs["onnxruntime"].shape == (7, 128, 192, 3)
    assert np.abs(outs["torch"].astype(int) - outs["onnxruntime"].astype(int)).max() <= 1
