"""The shipped recipes, recipe checks, and stage 2 by transfer learning end to end."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from vrestore.errors import VrestoreError
from vrestore.train.engine import TRAINER_MODEL_KEYS, Trainer, load_recipe

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_builds_its_final_model(path):
    from vrestore.models import build

    cfg = load_recipe(path)
    assert cfg.name == path.stem  # the file name says task, model and scale
    m = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k not in TRAINER_MODEL_KEYS}
    model = build(m.pop("name"), **m)
    for step in cfg.steps:
        if step.get("grow"):
            model.grow(int(step.grow))
    params = sum(p.numel() for p in model.parameters()) / 1e6
    if "c128n25" in path.stem:  # METHOD.md: 44.1 M, grown by 50 blocks to 55
        assert model.cfg.num_reconstruction_blocks == 55
        assert 44 + 14 < params < 44 + 16.5
        assert cfg.data.clip_len == 30 and cfg.data.patch == 256 and cfg.data.batch == 8
        assert cfg.optim.spynet_freeze == 5000 and cfg.optim.lr == 1e-4
        assert [s.loss for s in cfg.steps[-2:]] == ["mse", "mse"] and cfg.steps[-1].subset
    if "swinir_m" in path.stem:
        assert 11.4 < params < 11.6


def test_recipe_mistakes_are_caught_before_training(tmp_path, tiny_pairs):
    base = {"name": "r", "model": {"name": "basicvsrpp_c16n2_x1"}, "data": {"train": str(tiny_pairs)}}
    bad = [({"iters": 2, "loss": "huber"}, "unknown loss"), ({"iters": 2, "data": "frames"}, "unknown data kind"),
           ({"loss": "mse"}, "lacks 'iters'"), ({"iters": 2, "subset": ["ldv_*"]}, "matches no clip")]
    for step, msg in bad:
        p = tmp_path / "r.yaml"
        OmegaConf.save(OmegaConf.create({**base, "steps": [step]}), p)
        with pytest.raises(VrestoreError, match=msg):
            load_recipe(p)
    OmegaConf.save(OmegaConf.create({**base, "steps": [{"iters": 2, "subset": ["bikes_*"]}]}), tmp_path / "ok.yaml")
    load_recipe(tmp_path / "ok.yaml")  # a pattern that matches


def test_stage2_transfer_recipe_runs_end_to_end(tmp_path, tiny_pairs, random_model):
    """Denoising pre-training on photographs, then fine-tuning on cached
    stage-1 outputs, validated on stage-1 outputs of the validation clips;
    TensorBoard gets the same scalars as metrics.jsonl."""
    from vrestore import load
    from vrestore.models import save

    stage1 = save(random_model("basicvsrpp_c16n2_x1"), tmp_path / "stage1.safetensors")
    cfg = OmegaConf.create({
        "name": "s2", "out": str(tmp_path / "run"), "seed": 0, "device": "cpu", "dtype": "fp32",
        "model": {"name": "swinir_e24_color_dn", "zero_last": True},
        "data": {"train": str(tiny_pairs), "stage1": str(stage1), "cache_frames": 6, "patch": 32, "batch": 2},
        "val": {"data": str(tiny_pairs), "every": 3, "max_frames": 4, "at_start": True},
        "optim": {"lr": 5e-4, "ema": 0.5}, "checkpoint_every": 3,
        "steps": [{"name": "denoise_pretrain", "iters": 3, "data": "noisy_stills"},
                  {"name": "finetune", "iters": 3, "data": "stage1_cache", "loss": "mse"}]})
    import io

    from rich.console import Console

    from vrestore.cli import progress_bar

    shown = io.StringIO()  # the command's own bar, drawn: each task must carry the fields its columns show
    with progress_bar(Console(file=shown, force_terminal=True, width=160)) as pb:
        final = Trainer(cfg).run(pb)
    assert "stage-1 outputs -> stage1_cache" in shown.getvalue()
    # the stage-1 passes (minutes on a CPU, before the first step) show on the progress bar, all frames counted
    cached = {t.description: (t.completed, t.total) for t in pb.tasks if t.description.startswith("stage-1")}
    assert cached == {"stage-1 outputs -> stage1_val_cache": (4, 4), "stage-1 outputs -> stage1_cache": (6, 6)}
    run = tmp_path / "run"
    assert (run / "checkpoints" / "denoise_pretrain.safetensors").exists()
    assert (run / "stage1_cache" / "index.json").exists() and (run / "stage1_val_cache" / "index.json").exists()
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_psnr"] for r in recs if "val_psnr" in r]
    assert recs[0]["iter"] == 0 and len(val) == 3
    # zero_last: before training, stage 2 hands back the stage-1 output unchanged
    import numpy as np

    from vrestore.metrics import psnr

    cache = run / "stage1_val_cache"
    pairs = zip(np.load(cache / "input_0.npy"), np.load(cache / "gt_0.npy"), strict=True)
    ref = np.mean([psnr(a, b) for a, b in pairs])
    assert val[0] == pytest.approx(ref, abs=1e-6)
    # each validation is logged per clip too, and the mean of those is val_psnr
    per_clip = [r["val_psnr_clips"] for r in recs if "val_psnr" in r]
    names = json.loads((cache / "index.json").read_text())["names"]
    assert all(list(c) == names for c in per_clip)
    assert all(np.mean(list(c.values())) == pytest.approx(v, abs=1e-3) for c, v in zip(per_clip, val, strict=True))
    assert per_clip[0][names[0]] == pytest.approx(ref, abs=1e-4)
    assert load(final).arch_name == "swinir"
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_a_stage1_cache_is_rebuilt_when_its_stage1_model_or_clips_change(tmp_path, tiny_pairs, random_model):
    """A cache left in the run folder by an earlier run with another stage-1
    model (or other data) must not be fine-tuned on silently."""
    import numpy as np

    from vrestore.models import save

    stage1 = tmp_path / "stage1.safetensors"
    save(random_model("basicvsrpp_c16n2_x1"), stage1)
    cfg = OmegaConf.create({
        "name": "s2", "out": str(tmp_path / "run"), "seed": 0, "device": "cpu", "dtype": "fp32",
        "model": {"name": "swinir_e24_color_dn"},
        "data": {"train": str(tiny_pairs), "stage1": str(stage1), "cache_frames": 3, "patch": 32, "batch": 2},
        "steps": [{"iters": 1, "data": "stage1_cache"}]})
    trainer = Trainer(cfg)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "stage1_cache.npz").write_bytes(b"x")  # the single-file cache of earlier versions: replaced
    (run / ".stage1_cache.tmp-1").mkdir()  # a build killed part-way: cleared
    cache = trainer._stage1_cache(str(tiny_pairs), "stage1_cache")
    assert not (run / "stage1_cache.npz").exists() and not list(run.glob(".stage1_cache.tmp-*"))
    first = np.load(cache / "input_0.npy")
    stamp = (cache / "index.json").stat().st_mtime_ns
    assert (trainer._stage1_cache(str(tiny_pairs), "stage1_cache") / "index.json").stat().st_mtime_ns == stamp
    other = random_model("basicvsrpp_c16n2_x1")
    with torch.no_grad():
        other.conv_last.bias.fill_(0.1)  # a visibly different stage 1
    save(other, stage1)
    again = np.load(trainer._stage1_cache(str(tiny_pairs), "stage1_cache") / "input_0.npy")
    assert first.shape == again.shape and np.abs(first.astype(int) - again.astype(int)).mean() > 5
    trainer.cfg.data.cache_frames = 2
    cache = trainer._stage1_cache(str(tiny_pairs), "stage1_cache")
    assert len(np.load(cache / "input_0.npy")) == 2
    # a step's subset picks cached clips by name, as it picks clips for stage 1
    from vrestore.data.pairs import FramePairs

    names = json.loads((cache / "index.json").read_text())["names"]
    assert names == [c for c in json.loads((tiny_pairs / "meta.json").read_text())["clips"]]
    one = FramePairs(cache, 32, subset=[names[-1][:3] + "*"])
    assert isinstance(one.inp[0], np.memmap)  # read from disk as needed, not held in memory
    assert len(one.inp) == 1 and (one.gt[0] == np.load(cache / f"gt_{len(names) - 1}.npy")).all()
    with pytest.raises(VrestoreError, match="matches none"):
        FramePairs(cache, 32, subset=["no_such_clip*"])


def test_a_variant_recipe_is_its_base_with_its_changes(tmp_path):
    OmegaConf.save(OmegaConf.create({"name": "base", "model": {"name": "basicvsrpp_c16n2_x1", "pqf_propagation": True},
                                     "steps": [{"iters": 4}, {"iters": 2, "loss": "mse"}]}), tmp_path / "base.yaml")
    OmegaConf.save(OmegaConf.create({"name": "v", "base": "base.yaml", "model": {"pqf_propagation": False}}),
                   tmp_path / "v.yaml")
    cfg = load_recipe(tmp_path / "v.yaml")
    assert cfg.name == "v" and "base" not in cfg
    assert cfg.model.name == "basicvsrpp_c16n2_x1" and cfg.model.pqf_propagation is False
    assert [s.iters for s in cfg.steps] == [4, 2]
    OmegaConf.save(OmegaConf.create({"name": "w", "base": "missing.yaml"}), tmp_path / "w.yaml")
    with pytest.raises(VrestoreError, match="missing.yaml: no such recipe"):
        load_recipe(tmp_path / "w.yaml")


def test_a_stage2_trained_to_run_alone_caches_the_compressed_frames(tmp_path, tiny_pairs):
    """``data.stage1: none``: stage 2 fine-tunes and validates on the compressed frames themselves (what it
    will see with no stage 1 in front of it); the cache says so, and one made by a stage-1 model is rebuilt."""
    import shutil

    import numpy as np

    from vrestore.data.pairs import PairedClips
    from vrestore.video.io import VideoWriter

    # a second validation clip (the same input, a darker truth) so that the per-clip records differ
    val = tmp_path / "val"
    shutil.copytree(tiny_pairs, val)
    meta = json.loads((val / "meta.json").read_text())
    (name, clip), = meta["clips"].items()
    with VideoWriter(val / "gt" / "darker.mkv", fps=25, codec="ffv1") as wr:
        for f in PairedClips(str(tiny_pairs), 2, 2, dedup=False).clips[0].gt:
            wr.write(np.clip(f.astype(int) - 12, 0, 255).astype(np.uint8))
    meta["clips"]["darker"] = clip | {"gt": "gt/darker.mkv"}
    (val / "meta.json").write_text(json.dumps(meta))
    cfg = OmegaConf.create({
        "name": "s2", "out": str(tmp_path / "run"), "seed": 0, "device": "cpu", "dtype": "fp32",
        "model": {"name": "swinir_e24_color_dn", "zero_last": True},  # starts as the identity
        "data": {"train": str(tiny_pairs), "stage1": "none", "cache_frames": 3, "patch": 32, "batch": 2},
        "val": {"data": str(val), "every": 2, "max_frames": 2},
        "steps": [{"iters": 2, "data": "stage1_cache", "loss": "mse"}]})
    trainer = Trainer(cfg)
    cache = trainer._stage1_cache(str(tiny_pairs), "stage1_cache")
    clips = PairedClips(str(tiny_pairs), 2, 2, dedup=False).clips
    for k, c in enumerate(clips):
        assert np.array_equal(np.load(cache / f"input_{k}.npy"), c.lq[:3])
        assert np.array_equal(np.load(cache / f"gt_{k}.npy"), c.gt[:3])
    assert json.loads(json.loads((cache / "index.json").read_text())["made_from"])["stage1"] == "none"
    trainer.run(None)
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (rec,) = [r for r in recs if "val_psnr" in r]
    clips_psnr = rec["val_psnr_clips"]
    assert set(clips_psnr) == {name, "darker"} and clips_psnr[name] > clips_psnr["darker"] + 3
    assert rec["val_psnr"] == pytest.approx(np.mean(list(clips_psnr.values())), abs=1e-3)
    del cfg.data["stage1"]  # forgotten: an error, not a silent stage 2 on the compressed frames
    with pytest.raises(VrestoreError, match="needs data.stage1"):
        Trainer(cfg)._stage1_cache(str(tiny_pairs), "stage1_cache")


def test_a_recipe_trains_on_several_prepared_sets(tmp_path, tiny_pairs, renamed_copy):
    """``data.train`` may list prepared sets (real clips plus procedural cartoons, say): a step's subset may name a
    clip of any of them, the stage-2 cache holds every set's clips in order, and a cache made from one set is not
    reused for two."""
    import numpy as np

    from vrestore.data.pairs import PairedClips

    other = renamed_copy(tiny_pairs, tmp_path / "cartoons", "cartoon_000")
    recipe = {"name": "s2", "out": str(tmp_path / "run"), "seed": 0, "device": "cpu", "dtype": "fp32",
              "model": {"name": "swinir_e24_color_dn", "zero_last": True},
              "data": {"train": [str(tiny_pairs), str(other)], "stage1": "none", "cache_frames": 3, "patch": 32,
                       "batch": 2},
              "steps": [{"iters": 1, "data": "stage1_cache", "loss": "mse"},
                        {"iters": 1, "data": "stage1_cache", "loss": "mse", "subset": ["cartoon_*"]}]}
    OmegaConf.save(OmegaConf.create(recipe), tmp_path / "s2.yaml")
    cfg = load_recipe(tmp_path / "s2.yaml")  # the subset matches a clip of the second set only
    OmegaConf.save(OmegaConf.merge(cfg, {"steps": [{"iters": 1, "subset": ["nothing_*"]}]}), tmp_path / "bad.yaml")
    with pytest.raises(VrestoreError, match=f"matches no clip of {tiny_pairs}, {other}"):
        load_recipe(tmp_path / "bad.yaml")
    twice = OmegaConf.merge(cfg, {"data": {"train": [str(tiny_pairs), str(other), str(tiny_pairs)]}})
    OmegaConf.save(twice, tmp_path / "twice.yaml")
    with pytest.raises(VrestoreError, match="is in both"):  # at load, not after a first step of other data
        load_recipe(tmp_path / "twice.yaml")
    trainer = Trainer(cfg)
    single = json.loads((trainer._stage1_cache(str(tiny_pairs), "stage1_cache") / "index.json").read_text())
    assert single["names"] == [c.name for c in PairedClips(tiny_pairs, 2, 2).clips]
    final = trainer.run(None)  # the list replaces the one-set cache: rebuilt, not reused
    clips = PairedClips([tiny_pairs, other], 2, 2).clips
    cache = tmp_path / "run" / "stage1_cache"
    index = json.loads((cache / "index.json").read_text())
    assert index["names"] == [c.name for c in clips] and clips[-1].name == "cartoon_000"
    assert json.loads(index["made_from"])["data"] == [str(tiny_pairs.resolve()), str(other.resolve())]
    for k, c in enumerate(clips):
        assert np.array_equal(np.load(cache / f"input_{k}.npy"), c.lq[:3])
    assert final.exists()
