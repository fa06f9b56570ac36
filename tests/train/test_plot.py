import json

import matplotlib.image as mpimg
import pytest
from typer.testing import CliRunner

from vrestore.cli import app
from vrestore.errors import VrestoreError
from vrestore.train.plot import read_log


def _log(path):
    lines = [{"iter": i, "step": "charb" if i <= 6 else "mse", "loss": 0.05 / i, "lr": 1e-4} for i in range(1, 11)]
    lines[3]["val_psnr"] = 30.0
    lines[9]["val_psnr"] = 30.5
    lines[3]["val_psnr_clips"] = {"photo_camera": 29.0, "photo_logo": 31.0}
    lines[9]["val_psnr_clips"] = {"photo_camera": 29.2, "photo_logo": 31.8}
    resumed = [{"iter": 9, "step": "mse", "loss": 0.001, "lr": 1e-4}]  # a resume repeats iteration 9
    text = "".join(json.dumps(r) + "\n" for r in lines[:9] + resumed + lines[9:]) + '{"iter": 11, "lo'
    path.write_text(text)
    return path


def test_plot_log_draws_curves_and_summarises(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _log(run / "metrics.jsonl")
    recs = read_log(run)
    assert [r["iter"] for r in recs] == list(range(1, 11))  # resumed duplicate merged, torn line skipped
    assert recs[8]["loss"] == 0.001
    r = CliRunner().invoke(app, ["plot-log", str(run)])
    assert r.exit_code == 0, r.output
    assert "10 records to iteration 10" in r.output and "30.00 -> 30.50" in r.output
    img = mpimg.imread(run / "curves.png")
    assert img.shape[0] > 300 and img.shape[1] > 600
    from vrestore.train.plot import plot_log

    summary = plot_log(run, tmp_path / "c.png")
    assert summary["val_clips_first_last"] == {"photo_camera": [29.0, 29.2], "photo_logo": [31.0, 31.8]}
    (run / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "val_psnr_clips"}) + "\n"
                                               for r in recs))
    assert "val_clips_first_last" not in plot_log(run, tmp_path / "d.png")  # logs from before the per-clip records
    assert mpimg.imread(tmp_path / "d.png").shape[0] < mpimg.imread(tmp_path / "c.png").shape[0]


def test_plot_log_errors(tmp_path):
    with pytest.raises(VrestoreError, match="no such training log"):
        read_log(tmp_path / "nothing")
    (tmp_path / "metrics.jsonl").write_text("not json\n")
    r = CliRunner().invoke(app, ["plot-log", str(tmp_path / "metrics.jsonl")])
    assert r.exit_code == 2 and "no training records" in r.output
