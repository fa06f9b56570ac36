import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

import vrestore
from vrestore.errors import VrestoreError
from vrestore.models import build, save


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EVIL_MARK']}",))


def test_pickled_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARK", str(mark))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"params": _Evil()}, fh)
    torch.save({"state_dict": {"x": _Evil()}}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(VrestoreError, match="refused|not a readable"):
            vrestore.load(p)
    assert not mark.exists()


def test_truncated_and_unknown_files(tmp_path):
    m = build("swinir_e24_color_dn")
    save(m, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VrestoreError, match="not a readable safetensors"):
        vrestore.load(tmp_path / "cut.safetensors")
    torch.save({"state_dict": {"foo.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(VrestoreError, match="unknown checkpoint"):
        vrestore.load(tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00\x01junk")
    with pytest.raises(VrestoreError):
        vrestore.load(tmp_path / "junk.pth")
    with pytest.raises(VrestoreError, match="no such checkpoint"):
        vrestore.load(tmp_path / "missing.pth")


def test_convert_published_to_safetensors(reference_dir, tmp_path):
    from typer.testing import CliRunner

    from vrestore.cli import app

    out = tmp_path / "c.safetensors"
    r = CliRunner().invoke(app, ["convert", str(reference_dir / "basicvsrpp_c16n2_x4.pth"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    a, b = vrestore.load(reference_dir / "basicvsrpp_c16n2_x4.pth"), vrestore.load(out)
    x = torch.rand(1, 2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_convert_half_keeps_metadata_and_output(tmp_path):
    """Bundled models are written with ``convert --half``: half the bytes, the run's metadata kept, outputs within
    float16 rounding, and a conversion onto its own source refused."""
    from typer.testing import CliRunner

    from vrestore.cli import app

    torch.manual_seed(0)
    m = build("basicvsrpp", mid_channels=8, num_blocks=1, is_low_res_input=True, scale=4).eval()
    src, dst = tmp_path / "run.safetensors", tmp_path / "half.safetensors"
    save(m, src, {"recipe": "x4_tiny", "iterations": "7"})
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(dst), "--half"])
    assert r.exit_code == 0, r.output
    h = vrestore.load(dst)
    mask = os.umask(0)
    os.umask(mask)
    assert dst.stat().st_mode & 0o777 == 0o666 & ~mask  # not the 0600 safetensors itself writes
    assert h.vrestore_meta["recipe"] == "x4_tiny" and h.vrestore_meta["stored_dtype"] == "float16"
    assert next(h.parameters()).dtype == torch.float32  # cast back on load
    assert dst.stat().st_size < 0.6 * src.stat().st_size
    x = torch.rand(1, 3, 3, 16, 16)
    with torch.no_grad():
        assert (h(x) - m(x)).abs().max() < 5e-3
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(src), "--half"])
    assert r.exit_code != 0 and "its own source" in r.output
    stamp = dst.stat().st_mtime_ns
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(dst)])  # an existing output is kept ...
    assert r.exit_code == 2 and "--overwrite" in r.output and dst.stat().st_mtime_ns == stamp
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(dst), "--overwrite"])  # ... unless asked
    assert r.exit_code == 0, r.output
    assert all(t.dtype == torch.float32 for t in load_file(dst).values())  # the float16 file was replaced
