import json

from typer.testing import CliRunner

from vrestore.cli import app

runner = CliRunner()


def test_degrade_info_eval(tmp_path, small_clean):
    lq, gt = tmp_path / "lq.mp4", tmp_path / "gt.mkv"
    r = runner.invoke(app, ["degrade", str(small_clean), "-o", str(lq), "--gt", str(gt)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["info", str(lq), "--json"])
    assert r.exit_code == 0, r.output
    meta = json.loads(r.stdout)
    assert meta["num_frames"] == 20 and meta["pqf_guess"]["phase"] == 0
    r = runner.invoke(app, ["eval", "--ref", str(gt), "--dist", str(lq), "--json", str(tmp_path / "e.json"),
                            "--csv", str(tmp_path / "e.csv"), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    scores = json.loads((tmp_path / "e.json").read_text())
    assert 25 < scores["average"]["psnr_rgb"] < 45
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert "psnr_rgb" in (tmp_path / "e.csv").read_text()


def test_user_errors_are_one_line_with_status_2(tmp_path):
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(b"not a video at all")
    for args in (["info", str(tmp_path / "missing.mp4")], ["info", str(bad)],
                 ["degrade", str(bad), "-o", str(tmp_path / "o.mp4")],
                 ["eval", "--ref", str(bad), "--dist", str(tmp_path / "nope")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output
    assert not (tmp_path / "o.mp4").exists()


def test_models_lists_each_bundled_model_with_what_it_runs():
    r = runner.invoke(app, ["models"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == "bundled models:"
    hq = next(line for line in lines if line.startswith("  qe-hq "))
    assert "(x1, 2 stage 2s averaged, no stage 1)" in hq and "dB" in hq
    assert any(line.startswith("  qe-fast (x1, stage 2 only)") for line in lines)
    assert any(line.startswith("  x4 (x4, stage 1 only)") for line in lines)
    assert any(line.startswith("  qe (x1, stage 1 + stage 2)") for line in lines)
    assert "swinir_t2_g3_color_dn" in lines[-1]
