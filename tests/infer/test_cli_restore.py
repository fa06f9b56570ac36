import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vrestore.cli import app
from vrestore.models import build, save
from vrestore.video.io import VideoReader, VideoWriter

runner = CliRunner()


def _model(tmp_path):
    torch.manual_seed(0)
    m = build("basicvsrpp_c16n2_x4")
    path = tmp_path / "m.safetensors"
    save(m, path)
    return path


def test_restore_folder_reports_failures_and_resumes(tmp_path, small_frames):
    src = tmp_path / ("in_" + "x" * 80)  # a failure's line names the file whole, however long its path
    src.mkdir()
    for name in ("a", "b"):
        with VideoWriter(src / f"{name}.mp4", codec="x264") as w:
            for f in small_frames[:5, :32, :48]:
                w.write(np.ascontiguousarray(f))
    (src / "c_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\xff" * 3000)
    model = _model(tmp_path)
    out = tmp_path / "out"
    args = ["restore", str(src), "-o", str(out), "--model", str(model), "--codec", "ffv1", "--dtype", "fp32"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output
    assert "2 restored" in r.output
    assert any(ln.startswith(f"failed {src / 'c_corrupt.mp4'}: ") for ln in r.output.splitlines()), r.output
    assert sorted(p.name for p in out.iterdir()) == ["a.mkv", "b.mkv"]
    assert sum(1 for _ in VideoReader(out / "a.mkv")) == 5
    before = (out / "a.mkv").stat().st_mtime_ns
    r = runner.invoke(app, args)
    assert "2 already done" in r.output
    assert (out / "a.mkv").stat().st_mtime_ns == before


def test_restore_single_file_and_refusals(tmp_path, small_frames):
    src = tmp_path / "in.mkv"
    with VideoWriter(src, codec="ffv1") as w:
        for f in small_frames[:4, :32, :48]:
            w.write(np.ascontiguousarray(f))
    model = _model(tmp_path)
    out = tmp_path / "out.mkv"
    r = runner.invoke(app, ["restore", str(src), "-o", str(out), "--model", str(model), "--dtype", "fp32",
                            "--pqf", "0,2"])
    assert r.exit_code == 0, r.output
    assert next(iter(VideoReader(out))).rgb.shape == (128, 192, 3)
    r = runner.invoke(app, ["restore", str(src), "-o", str(out), "--model", str(model)])
    assert r.exit_code == 2 and "already exists" in r.output
    r = runner.invoke(app, ["restore", str(src), "-o", str(src), "--model", str(model), "--overwrite"])
    assert r.exit_code == 2 and "input file" in r.output
    r = runner.invoke(app, ["restore", str(src), "-o", str(tmp_path / "x.mkv"), "--model", str(tmp_path / "no.pth")])
    assert r.exit_code == 2 and "no such checkpoint" in r.output


def test_restore_with_two_stage2_checkpoints_and_stage2_tta(tmp_path, small_frames):
    """``--stage2`` repeated is a stage-2 ensemble: the CLI restores with it (and with ``--stage2-tta``), and
    ``make_restorer`` hands the Restorer both checkpoints; 'none' beside a checkpoint, and a transform count that
    is not 1, 2, 4 or 8, are refused."""
    from vrestore.cli import make_restorer

    src = tmp_path / "in.mkv"
    with VideoWriter(src, codec="ffv1") as w:
        for f in small_frames[:3, :32, :32]:
            w.write(np.ascontiguousarray(f))
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"s2_{seed}.safetensors")
        save(build("swinir_e24_color_dn"), paths[-1])
    stage1 = str(_model(tmp_path))
    out = tmp_path / "out.mkv"
    r = runner.invoke(app, ["restore", str(src), "-o", str(out), "--model", stage1, "--dtype", "fp32",
                            "--stage2", str(paths[0]), "--stage2", str(paths[1]), "--stage2-tta", "2"])
    assert r.exit_code == 0, r.output
    assert sum(1 for _ in VideoReader(out)) == 3
    r = runner.invoke(app, ["restore", str(src), "-o", str(tmp_path / "o3.mkv"), "--model", stage1,
                            "--stage2", str(paths[0]), "--stage2-tta", "3"])
    assert r.exit_code == 2 and "1, 2, 4, 8 transforms" in r.output, r.output
    kw = {"tta": False, "dedup": False, "device": "cpu", "dtype": "fp32", "chunk": 4, "overlap": 0, "tile": 0}
    assert len(make_restorer(stage1, [str(p) for p in paths], None, **kw).stage2) == 2
    assert make_restorer(stage1, str(paths[0]), None, stage2_tta=4, **kw).stage2_transforms == (0, 2, 4, 6)
    assert make_restorer("qe", ["none"], None, **kw).stage2 is None
    assert len(make_restorer("qe", ["qe:stage2", "qe-fast:stage2"], None, **kw).stage2) == 2  # bundled names
    r = runner.invoke(app, ["restore", str(src), "-o", str(tmp_path / "o2.mkv"), "--model", stage1,
                            "--stage2", "none", "--stage2", str(paths[0])])
    assert r.exit_code == 2 and "cannot be given with" in r.output, r.output


def test_bench_reports_json(tmp_path):
    r = runner.invoke(app, ["bench", "--model", "basicvsrpp_c16n2_x1", "--size", "64x48", "--frames", "3",
                            "--dtype", "fp32", "--chunk", "2", "--overlap", "1", "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["frames"] == 3 and res["fps"] > 0 and res["peak_rss_mb"] > 0
    assert not res["stage2_used"] and res["tile"] == 0  # bench tiles only when asked
    for tile, want in (("32", 32), ("-1", 0)):  # -1: restore's default, none below the threshold
        r = runner.invoke(app, ["bench", "--model", "basicvsrpp_c16n2_x1", "--size", "64x48", "--frames", "2",
                                "--dtype", "fp32", "--chunk", "2", "--overlap", "0", "--tile", tile,
                                "--json", str(tmp_path / "t.json")])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / "t.json").read_text())["tile"] == want


@pytest.mark.parametrize("stage2,members,plain,tta", [(["auto"], 1, False, 1), (["none"], 0, True, 1),
                                                     (["swinir_t2_g3_color_dn"], 1, False, 1),  # stage2_depth
                                                     (["qe:stage2", "qe-fast:stage2"], 2, False, 1),  # ensemble
                                                     (["auto"], 1, False, 2)])  # stage-2 TTA
def test_bench_of_a_bundled_model_runs_its_stage_2_as_restore_does(tmp_path, stage2, members, plain, tta):
    r = runner.invoke(app, ["bench", "--model", "qe", *(a for s in stage2 for a in ("--stage2", s)), "--size",
                            "64x48", "--frames", "2", "--chunk", "2", "--overlap", "0", "--device", "cpu",
                            "--stage2-tta", str(tta), "--json", str(tmp_path / "b.json")]
                      + (["--plain"] if plain else []))
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["stage2_members"] == members and res["stage2_used"] is (members > 0) and res["stage2_tta"] == tta
    assert res["stage2"] == (stage2[0] if len(stage2) == 1 else stage2)
    assert res["channels_last"] is not plain  # --plain applies to bundled models too (on the CPU, else channels-last)


def test_demo_runs_and_reports(tmp_path):
    r = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo")])
    assert r.exit_code == 0, r.output
    assert "RGB-PSNR" in r.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["frames"] == 48 and 20 < report["compressed"]["psnr_rgb"] < 40
    # the README's promise: the bundled model helps on the demo clip (+0.165 dB measured; the model card says +0.17)
    assert report["gain_psnr_rgb_db"] > 0.12
    before, after = report["compressed"]["psnr_rgb"], report["restored"]["psnr_rgb"]
    assert report["gain_psnr_rgb_db"] == pytest.approx(after - before)
    assert (tmp_path / "demo" / "comparison.png").stat().st_size > 10000
