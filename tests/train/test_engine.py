import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from vrestore.train.engine import Trainer, ema_warmup, lr_factor


@pytest.fixture(scope="module")
def x4_pairs(tmp_path_factory, small_clean):
    from vrestore.video.degrade import prepare_dataset

    out = tmp_path_factory.mktemp("pairs") / "x4"
    prepare_dataset(small_clean, out, task="x4")
    return out


def _recipe(tmp_path, data, steps, **extra):
    cfg = {"name": "tiny", "out": str(tmp_path / "run"), "seed": 0, "device": "cpu", "dtype": "fp32",
           "model": {"name": "basicvsrpp_c16n2_x4", "pqf_propagation": True},
           "data": {"train": str(data), "clip_len": 4, "patch": 64, "batch": 2},
           "optim": {"lr": 1e-3, "warmup": 0.1, "grad_clip": 1.0, "spynet_freeze": 2, "ema": 0.9},
           "checkpoint_every": 3, "steps": steps}
    cfg.update(extra)
    path = tmp_path / "recipe.yaml"
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path, OmegaConf.create(cfg)


def test_schedule_warms_up_then_decays():
    f = [lr_factor(i, 100, 0.1, 1) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[-1] < 0.05
    g = [lr_factor(i, 100, 0.0, 2) for i in range(100)]
    assert g[49] < 0.05 and g[50] == pytest.approx(1.0)  # a restart


def test_ema_follows_the_model_early_and_settles_later(tmp_path, x4_pairs):
    """With a slow EMA (0.999) and a short step, the saved weights must be the
    trained ones, not mostly the random start."""
    assert ema_warmup(0.999, 0) == pytest.approx(0.1) and ema_warmup(0.999, 10**6) == 0.999
    _, cfg = _recipe(tmp_path, x4_pairs, [{"iters": 12, "loss": "mse"}])
    cfg.optim.ema = 0.999
    tr = Trainer(cfg)
    start = [p.detach().clone() for p in tr.model.parameters()]
    tr.run()
    moved = sum(float((p - s).norm() ** 2) for p, s in zip(tr.model.parameters(), start, strict=True)) ** 0.5
    pairs = zip(tr.ema.parameters(), tr.model.parameters(), strict=True)
    lag = sum(float((e - p).norm() ** 2) for e, p in pairs) ** 0.5
    assert moved > 0 and lag < 0.5 * moved


def test_tiny_recipe_learns_grows_and_runs_three_loss_steps(tmp_path, x4_pairs):
    steps = [{"name": "charb", "iters": 16, "loss": "charbonnier"},
             {"name": "grow", "iters": 4, "loss": "charbonnier", "grow": 2},
             {"name": "mse", "iters": 3, "loss": "mse", "lr": 2e-4},
             {"name": "mse_subset", "iters": 3, "loss": "mse", "lr": 1e-4, "subset": ["bikes_small"]}]
    _, cfg = _recipe(tmp_path, x4_pairs, steps, val={"data": str(x4_pairs), "every": 8, "max_frames": 4})
    tr = Trainer(cfg)
    final = tr.run()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("step") == "charb"]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert {r["step"] for r in recs if "step" in r} == {"charb", "grow", "mse", "mse_subset"}
    assert tr.model.cfg.num_reconstruction_blocks == 7
    assert any("val_psnr" in r for r in recs)
    import vrestore

    m = vrestore.load(final)
    assert m.cfg.num_reconstruction_blocks == 7 and m.cfg.pqf_propagation


def test_the_final_weights_are_validated_once_when_the_last_step_ends_between_validations(tmp_path, x4_pairs):
    """Validation every 3 iterations of 5: the weights saved as final (iteration 5) must be scored too, compete
    for best.pt, and a resumed finished run must not score them again."""
    _, cfg = _recipe(tmp_path, x4_pairs, [{"iters": 5, "loss": "mse"}],
                     val={"data": str(x4_pairs), "every": 3, "max_frames": 4})
    tr = Trainer(cfg)
    tr.run()
    log = tmp_path / "run" / "metrics.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    val = [r for r in recs if "val_psnr" in r]
    assert [r["iter"] for r in val] == [3, 5] and val[-1]["event"] == "final validation"
    assert val[-1]["val_psnr"] == pytest.approx(tr.validate(), abs=1e-9)  # the final weights' own score
    assert tr.state["best_psnr"] == pytest.approx(max(r["val_psnr"] for r in val), abs=1e-9)
    lines = log.read_text()
    Trainer(cfg, resume=True).run()
    assert log.read_text() == lines


def _run(recipe, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "vrestore.cli", "train", str(recipe), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


RESUME_RECIPES = {
    "restoration": [{"name": "a", "iters": 8, "loss": "charbonnier"},
                    {"name": "b", "iters": 4, "loss": "mse", "grow": 1}],
    # killed inside the flow step: its data RNG and the one-off reset of SPyNet's output layers must resume exactly
    "flow": [{"name": "flow", "iters": 8, "data": "known_flow", "loss": "epe", "patch": 32, "batch": 4,
              "lr": 1e-3, "max_shift": 3.0},
             {"name": "b", "iters": 4, "loss": "mse"}],
}


@pytest.mark.parametrize("kind", sorted(RESUME_RECIPES))
def test_kill_9_then_resume_gives_identical_weights(tmp_path, x4_pairs, kind):
    steps = RESUME_RECIPES[kind]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    ref_dir.mkdir()
    cut_dir.mkdir()
    ref_recipe, _ = _recipe(ref_dir, x4_pairs, steps)
    cut_recipe, _ = _recipe(cut_dir, x4_pairs, steps)
    assert _run(ref_recipe).wait(timeout=600) == 0
    p = _run(cut_recipe)
    metrics = cut_dir / "run" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (cut_dir / "run" / "final.safetensors").exists()
    assert _run(cut_recipe, "--resume").wait(timeout=600) == 0
    a = load_file(ref_dir / "run" / "final.safetensors")
    b = load_file(cut_dir / "run" / "final.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, x4_pairs, monkeypatch):
    import errno

    import vrestore.train.engine as engine
    from vrestore.errors import VrestoreError

    _, cfg = _recipe(tmp_path, x4_pairs, [{"name": "a", "iters": 7, "loss": "charbonnier"}])
    tr = Trainer(cfg)
    real_save, calls = torch.save, []

    def save_then_fail(obj, f, *a, **kw):  # the first checkpoint succeeds, the next runs out of space
        calls.append(f)
        if len(calls) == 1:
            return real_save(obj, f, *a, **kw)
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine.torch, "save", save_then_fail)
    with pytest.raises(VrestoreError, match="No space left on device"):
        tr.run()
    ckpts = sorted(p.name for p in (tmp_path / "run").rglob("*.pt*"))
    assert ckpts == ["last.pt"]  # the temporary file was removed
    good = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert good["state"]["global_iter"] == 3
    monkeypatch.setattr(engine.torch, "save", real_save)
    tr2 = Trainer(cfg, resume=True)
    assert tr2.state["global_iter"] == 3
    tr2.run()


def test_compiled_recipe_matches_eager_and_trains_the_blocks_it_grows(tmp_path, x4_pairs):
    """``compile: true`` compiles the per-frame blocks in place: the same losses
    as eager, an eager EMA copy, and after growth a graph that runs (and
    trains) the new blocks rather than a stale one without them."""
    steps = [{"name": "a", "iters": 3, "loss": "mse"}, {"name": "b", "iters": 3, "loss": "mse", "grow": 1}]
    runs = {}
    for compiled in (False, True):
        (tmp_path / str(compiled)).mkdir()
        _, cfg = _recipe(tmp_path / str(compiled), x4_pairs, steps, compile=compiled, checkpoint_every=100)
        tr = Trainer(cfg)
        tr.run()
        log = (tmp_path / str(compiled) / "run" / "metrics.jsonl").read_text()
        recs = [json.loads(line) for line in log.splitlines()]
        runs[compiled] = (tr, [r["loss"] for r in recs if "loss" in r])
    (eager, l_eager), (comp, l_comp) = runs[False], runs[True]
    assert len(l_comp) == 6 and l_comp == pytest.approx(l_eager, rel=1e-4)
    assert comp.model.reconstruction._compiled_call_impl is not None
    assert comp.ema._compiled_call_impl is None and comp.ema.reconstruction._compiled_call_impl is None
    new = comp.model.reconstruction.main[2][-1].conv2.weight  # the grown block starts with conv2 at zero
    assert float(new.detach().abs().max()) > 0
    torch.testing.assert_close(new, eager.model.reconstruction.main[2][-1].conv2.weight, atol=1e-4, rtol=0)


def test_flow_pretraining_trains_spynet_alone_and_a_later_recipe_loads_it(tmp_path, x4_pairs):
    """A ``known_flow`` step lowers the flow error and changes SPyNet only; the
    restoration step after it keeps SPyNet frozen for ``spynet_freeze`` of its
    own iterations; ``model.spynet_init`` starts another recipe from it."""
    flow_step = {"name": "flow", "iters": 12, "data": "known_flow", "loss": "epe", "patch": 32, "batch": 4,
                 "lr": 1e-3, "max_shift": 3.0}
    (tmp_path / "a").mkdir()
    _, cfg = _recipe(tmp_path / "a", x4_pairs, [flow_step], checkpoint_every=100)
    tr = Trainer(cfg)
    assert tr.model.spynet.predicts_zero()
    start = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.run()
    recs = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in recs if r.get("zero_flow_epe", 0) > 0]) == 12
    after = tr.model.state_dict()
    assert not tr.model.spynet.predicts_zero()  # the output layers left the zero-flow saddle
    changed = {k for k in start if not torch.equal(start[k], after[k])}
    assert changed and all(k.startswith("spynet.") for k in changed)

    (tmp_path / "b").mkdir()  # the same flow step, then 2 restoration iterations with SPyNet frozen for 2
    _, cfg_b = _recipe(tmp_path / "b", x4_pairs, [flow_step, {"name": "r", "iters": 2, "loss": "mse"}],
                       checkpoint_every=100)
    tr_b = Trainer(cfg_b)
    tr_b.run()
    b = tr_b.model.state_dict()
    assert all(torch.equal(after[k], b[k]) for k in after if k.startswith("spynet."))
    assert not torch.equal(after["conv_last.weight"], b["conv_last.weight"])

    (tmp_path / "c").mkdir()
    init = str(tmp_path / "a" / "run" / "final.safetensors")
    _, cfg_c = _recipe(tmp_path / "c", x4_pairs, [{"iters": 1}])
    cfg_c.model.spynet_init = init
    c = Trainer(cfg_c).model.state_dict()
    saved = load_file(init)
    assert all(torch.equal(saved[k], c[k]) for k in saved if k.startswith("spynet."))


def test_a_flow_step_needs_the_epe_loss(tmp_path, x4_pairs):
    from vrestore.errors import VrestoreError

    _, cfg = _recipe(tmp_path, x4_pairs, [{"iters": 2, "data": "known_flow", "loss": "mse"}])
    with pytest.raises(VrestoreError, match="epe"):
        Trainer(cfg)


@pytest.mark.slow
def test_flow_pretraining_beats_zero_flow(tmp_path, x4_pairs):
    """Learning, not only running: after 800 iterations the flow error is well
    under what predicting no motion scores on the same batches (0.11 s per
    step at 64 px here; the zero-initialised output layers would stay at the
    zero-flow error, docs/models.md)."""
    step = {"name": "flow", "iters": 800, "data": "known_flow", "loss": "epe", "patch": 48, "batch": 8,
            "lr": 5e-4, "max_shift": 4.0}
    _, cfg = _recipe(tmp_path, x4_pairs, [step], checkpoint_every=1000, dtype="bf16")
    Trainer(cfg).run()
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-100:]
    epe, zero = (sum(r[k] for r in recs) / len(recs) for k in ("loss", "zero_flow_epe"))
    assert epe < 0.85 * zero, (epe, zero)
