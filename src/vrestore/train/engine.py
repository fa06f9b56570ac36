"""The training engine: one recipe, several steps (progressive growth, loss
changes, data subsets), resumable at any moment.

A recipe (YAML under ``configs/``) names the model, the data, the optimiser
and a list of ``steps``; each step trains a number of iterations with its own
loss, learning rate and warm-up + cosine schedule, after optionally growing
the reconstruction trunk. Batches come from a generator seeded by the global
iteration, and the learning rate is a pure function of the iteration, so a run
killed at any point and resumed from its last checkpoint continues with
exactly the state it would have had.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ..errors import VrestoreError
from ..infer import device as devmod

log = logging.getLogger(__name__)

#: recipe model keys the trainer acts on, not the network
TRAINER_MODEL_KEYS = ("init", "transfer", "zero_last", "he_init", "spynet_init")


def charbonnier(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


def epe(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """End-point error of flows (N, 2, H, W): the mean length of the error vector."""
    return torch.sqrt(((x - y) ** 2).sum(1) + 1e-12).mean()


LOSSES = {"charbonnier": charbonnier, "mse": F.mse_loss, "l1": F.l1_loss, "epe": epe}
#: training data of a step: prepared pairs, noisy photographs (stage-2 pre-training), cached stage-1 outputs,
#: photograph views with known flow (SPyNet pre-training)
DATA_KINDS = ("pairs", "noisy_stills", "stage1_cache", "known_flow")
FLOW_KIND = "known_flow"


def step_kind(cfg: DictConfig, step: DictConfig) -> str:
    return str(step.get("data", cfg.get("data", {}).get("kind", "pairs")))


def lr_factor(it: int, total: int, warmup: float, restarts: int, floor: float = 0.01) -> float:
    """Linear warm-up over ``warmup`` of the step, then cosine (with
    ``restarts`` equal periods) down to ``floor``."""
    w = int(round(warmup * total))
    if it < w:
        return (it + 1) / w
    rest = max(1, total - w)
    period = rest / max(1, restarts)
    pos = ((it - w) % period) / period
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * pos))


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> DictConfig:
    path = Path(path)
    if not path.exists():
        raise VrestoreError(f"{path}: no such recipe")
    try:
        cfg = OmegaConf.load(path)
        if "base" in cfg:  # a variant: the base recipe (relative to this file) with what this one changes
            base = load_recipe(path.parent / str(cfg.base))
            cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "base"})
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except VrestoreError:  # from the base recipe: it names its own file
        raise
    except Exception as e:  # omegaconf raises many types for malformed YAML/overrides
        raise VrestoreError(f"{path}: {e}") from None
    for key in ("name", "model", "steps"):
        if key not in cfg:
            raise VrestoreError(f"{path}: recipe lacks '{key}'")
    check_steps(cfg, path)
    return cfg


def check_steps(cfg: DictConfig, where: object = "recipe") -> None:
    """Catch at start what would otherwise stop a run hours in: unknown
    losses or data kinds, and subsets that match no clip."""
    from ..data.pairs import clip_names, data_roots, in_subset

    roots = data_roots(train_sets(cfg)) if cfg.get("data", {}).get("train") else []
    root = ", ".join(str(r) for r in roots)
    clips = None  # sets, and subsets of them, are checked where every set is prepared already
    if roots and all((r / "meta.json").exists() for r in roots):
        clips = clip_names(roots)  # also checks one scale and distinct names
    for i, step in enumerate(cfg.steps):
        label = f"{where}: step {i} ({step.get('name', '?')})"
        if "iters" not in step:
            raise VrestoreError(f"{label} lacks 'iters'")
        if step.get("loss", "charbonnier") not in LOSSES:
            raise VrestoreError(f"{label}: unknown loss {step.get('loss')!r}; use {', '.join(LOSSES)}")
        kind = step_kind(cfg, step)
        if kind not in DATA_KINDS:
            raise VrestoreError(f"{label}: unknown data kind {kind!r}")
        if (kind == FLOW_KIND) != (step.get("loss", "charbonnier") == "epe"):
            raise VrestoreError(f"{label}: the flow pre-training ('data: {FLOW_KIND}') and the 'epe' loss go "
                                "together")
        subset = step.get("subset")
        if subset and clips is not None:
            if not any(in_subset(n, subset) for n in clips):
                raise VrestoreError(f"{label}: subset {list(subset)} matches no clip of {root}")


def train_sets(cfg: DictConfig) -> str | list[str]:
    """``data.train``: one prepared data set folder, or a list of them."""
    train = cfg.data.train
    return [str(r) for r in train] if isinstance(train, ListConfig) else str(train)


def ema_warmup(decay: float, updates: int) -> float:
    """EMA decay for the update after ``updates`` others: min(decay, (1 + n) / (10 + n)).
    A fixed 0.999 keeps two thirds of the random initialisation after 400
    iterations (a short pre-training step saved a nearly random network);
    with the warm-up the average follows the model early and settles later."""
    return min(decay, (1 + updates) / (10 + updates))


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Hold an exclusive lock on the file ``lock`` (where the OS has ``fcntl``)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock (torchrun training runs on Linux)
        yield
        return
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def stage1_cache_key(stage1: str, root: str | list[str], clips: list[str], frames: int | None) -> str:
    """What a stage-1 output cache was made from (model file, data set or
    sets, clip names, frames per clip): a cache left in a run folder by other
    data or another stage-1 model must not be reused silently. ``none``: stage
    2 alone, its inputs the compressed frames."""
    data = str(Path(root).resolve()) if isinstance(root, str) else [str(Path(r).resolve()) for r in root]
    key = {"stage1": "none", "data": data, "clips": clips, "frames": frames}
    if not no_stage1(stage1):
        st = Path(stage1).stat()
        key |= {"stage1": str(Path(stage1).resolve()), "stage1_size": st.st_size, "stage1_mtime_ns": st.st_mtime_ns}
    return json.dumps(key, sort_keys=True)


def no_stage1(stage1: object) -> bool:
    """``data.stage1: none``: a stage 2 trained to run alone, on the compressed frames themselves."""
    return isinstance(stage1, str) and stage1.lower() == "none"


def init_distributed(precision: devmod.Precision) -> tuple[int, int, devmod.Precision]:
    """(rank, world size, this process's precision). Under ``torchrun``
    (WORLD_SIZE > 1) joins the process group: NCCL with one GPU per local
    rank, gloo on CPUs; multi-node set-ups come from torchrun's own flags."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, precision
    import torch.distributed as dist

    cuda = precision.device.type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        precision = devmod.Precision(torch.device("cuda", local), precision.dtype)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), precision


class IterationBatches(torch.utils.data.Dataset):
    """Item ``g``: this process's share of iteration g's global batch, split
    into micro-batches for gradient accumulation. A pure function of (seed,
    g): resuming, the number of processes and the number of data workers
    leave the samples of every iteration unchanged."""

    def __init__(self, data: Any, batch: int, seed: int, rank: int = 0, world: int = 1, accum: int = 1):
        self.data, self.batch, self.seed = data, batch, seed
        self.rank, self.world, self.accum = rank, world, accum

    def __len__(self) -> int:  # indices come from the sampler (global iterations)
        return 2**62

    def __getitem__(self, g: int) -> list[tuple]:
        sample = self.data.sample(self.batch, np.random.default_rng([self.seed, int(g)]))
        lq, gt, pqfs = sample[0], sample[1], (sample[2] if len(sample) > 2 else None)
        per = self.batch // (self.world * self.accum)
        chunks = [(a * self.world + self.rank) * per for a in range(self.accum)]
        return [(lq[c: c + per], gt[c: c + per], pqfs) for c in chunks]


class Trainer:
    """Runs a recipe; ``run()`` trains every step, checkpoints to
    ``out/checkpoints/last.pt`` and exports ``out/final.safetensors``."""

    def __init__(self, cfg: DictConfig, resume: bool = False, device: str = "auto", dtype: str = "auto"):
        check_steps(cfg, cfg.get("name", "recipe"))
        self.cfg = cfg
        self.out = Path(cfg.get("out", f"runs/{cfg.name}"))
        self.ckpt_dir = self.out / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.world, self.precision = init_distributed(
            devmod.select(cfg.get("device", device), cfg.get("dtype", dtype)))
        self._ddp: nn.Module | None = None
        self._ddp_key: tuple = ()
        # fp16 on CUDA needs loss scaling; bf16 and fp32 do not.
        fp16 = self.precision.device.type == "cuda" and self.precision.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.tb = self._tensorboard() if self.rank == 0 else None
        self.seed = int(cfg.get("seed", 0))
        self.state = {"global_iter": 0, "step_idx": 0, "iter_in_step": 0, "lr_scale": 1.0, "best_psnr": -1.0}
        self.model = self._prepared(self._build_model())
        self.ema: nn.Module | None = None
        self.optim: torch.optim.Optimizer | None = None
        self.metrics_path = self.out / "metrics.jsonl"
        self._datasets: dict[str, Any] = {}
        self.val_clips: dict[str, float] = {}  # the last validation's PSNR per clip
        self._progress = None  # run()'s progress bar, for long work before the first step (stage-1 caches)
        last = self.ckpt_dir / "last.pt"
        if resume and last.exists():
            self._load_checkpoint(last)
        else:
            if resume:
                log.warning("no checkpoint in %s; starting from scratch", self.ckpt_dir)
            if self.rank == 0:
                self._truncate_log(-1)  # a fresh start: records of an earlier attempt would mix with the new ones
        if self.rank == 0:
            OmegaConf.save(cfg, self.out / "recipe.yaml")

    def close(self) -> None:
        """Release the TensorBoard writer and leave the process group."""
        if self.tb is not None:
            self.tb.close()
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def _tensorboard(self):
        """A TensorBoard writer next to metrics.jsonl when TensorBoard is
        installed (``log.tensorboard: false`` turns it off)."""
        if not self.cfg.get("log", {}).get("tensorboard", True):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

    # -- model -------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        from ..models import build, load

        # plain values: a list (e.g. depths) would reach the checkpoint's JSON as a ListConfig and fail to save
        m = OmegaConf.to_container(self.cfg.model, resolve=True)
        init, transfer_from, zero_last, he_init, spynet_init = (m.pop(k, None) for k in TRAINER_MODEL_KEYS)
        name = m.pop("name", None) or m.pop("arch", None)
        if init and transfer_from:
            raise VrestoreError("model.init and model.transfer exclude each other: init loads a checkpoint as it "
                                "is, transfer builds model.name and carries a checkpoint's weights into it")
        if transfer_from and not name:
            raise VrestoreError("model.transfer needs model.name: the architecture to carry the weights into")
        if transfer_from and (zero_last or he_init):
            raise VrestoreError("model.transfer sets every weight, so zero_last and he_init would have no effect; "
                                "drop them (or set them to false where a base recipe sets them)")
        if init:
            model = load(init, **{k: v for k, v in m.items() if k in ("pqf_propagation", "pqf_period")})
        else:
            torch.manual_seed(self.seed)
            model = build(name, **m)
            if he_init:  # He initialisation (BasicVSR++): the default lets the signal die in the output head
                model.he_init()
            if zero_last:  # start as the identity (global residual only): no pre-trained weights to start from
                nn.init.zeros_(model.conv_last.weight)
                nn.init.zeros_(model.conv_last.bias)
        if transfer_from:
            from .transfer import transfer

            counts = transfer(model, load(transfer_from))
            log.info("model.transfer: %s tensors from %s (%s attentions with merged heads, %s new groups "
                     "started as the identity, %s left unused)", counts["copied"], transfer_from,
                     counts["merged_attentions"], counts["identity_groups"], counts["unused"])
        if spynet_init:  # a pre-trained flow network (another run's flow step, or a published checkpoint)
            if not hasattr(model, "spynet"):
                raise VrestoreError(f"model.spynet_init: {name or init} has no SPyNet")
            model.spynet.load_state_dict(load(spynet_init).spynet.state_dict())
        return model.train()

    @property
    def _memory_format(self) -> torch.memory_format:
        """channels-last on the CPU (oneDNN's fast convolutions: 4 % per step of
        the small QE recipe with bf16, ``benchmarks/run.py train``) unless the
        recipe says ``channels_last: false``."""
        cl = self.cfg.get("channels_last", None)
        cl = self.precision.channels_last if cl is None else bool(cl)
        return torch.channels_last if cl else torch.contiguous_format

    def _prepared(self, model: nn.Module) -> nn.Module:
        """The model on the device, in the memory format, and compiled when the
        recipe says ``compile: true`` (``devmod.compile_units``)."""
        model = model.to(self.precision.device).to(memory_format=self._memory_format)
        if self.cfg.get("compile", False):
            devmod.compile_units(model)
        return model

    def _param_groups(self, lr: float, spynet_mult: float) -> list[dict]:
        spy = [p for n, p in self.model.named_parameters() if n.startswith("spynet.")]
        rest = [p for n, p in self.model.named_parameters() if not n.startswith("spynet.")]
        groups = [{"params": rest, "lr": lr, "lr_mult": 1.0}]
        if spy:
            groups.append({"params": spy, "lr": lr * spynet_mult, "lr_mult": spynet_mult})
        return groups

    def _make_optimizer(self, step: DictConfig) -> None:
        o = self.cfg.get("optim", {})
        lr = float(step.get("lr", o.get("lr", 1e-4)))
        betas = tuple(o.get("betas", (0.9, 0.99)))
        # the flow pre-training trains SPyNet alone, at the step's own rate
        mult = 1.0 if step_kind(self.cfg, step) == FLOW_KIND else float(o.get("spynet_lr_mult", 0.25))
        self.optim = torch.optim.Adam(self._param_groups(lr, mult), lr=lr,
                                      betas=betas, eps=float(o.get("eps", 1e-8)),
                                      weight_decay=float(o.get("weight_decay", 0.0)))
        for g in self.optim.param_groups:
            g["base_lr"] = lr * g["lr_mult"]

    # -- data --------------------------------------------------------------
    def _dataset(self, step: DictConfig):
        from ..data.pairs import FramePairs, NoisyStills, PairedClips

        d = self.cfg.data
        kind = step_kind(self.cfg, step)
        subset = step.get("subset", None)
        key = f"{kind}:{subset}"
        if key not in self._datasets:
            if kind == "pairs":
                self._datasets[key] = PairedClips(train_sets(self.cfg), int(d.clip_len), int(d.patch),
                                                  subset=list(subset) if subset else None,
                                                  dedup=bool(d.get("dedup", False)))
            elif kind == FLOW_KIND:
                from ..data.flow import KnownFlowPairs

                self._datasets[key] = KnownFlowPairs(int(step.get("patch", 64)), float(step.get("max_shift", 12.0)))
            elif kind == "noisy_stills":
                self._datasets[key] = NoisyStills(int(d.patch), tuple(d.get("sigma", (5.0, 50.0))))
            else:  # stage1_cache (check_steps admits DATA_KINDS only)
                cache = self._stage1_cache(train_sets(self.cfg), "stage1_cache")
                self._datasets[key] = FramePairs(cache, int(d.patch), subset=list(subset) if subset else None)
        return self._datasets[key]

    def _stage1_cache(self, root: str | list[str], name: str, frames: int | None = None) -> Path:
        """Run the stage-1 model once over the clips of ``root`` (a data set, or a list of them) and cache
        (output, GT) frames in the folder ``name``, one .npy per clip written as
        it is restored (memory-mapped when read, like the data set's frames):
        stage 2 fine-tunes and validates on them."""
        from ..data.pairs import CACHE_INDEX, clip_names

        d = self.cfg.data
        if not d.get("stage1"):
            raise VrestoreError("a stage1_cache step needs data.stage1: a stage-1 checkpoint, or none for a stage 2 "
                                "that will run alone on the compressed frames")
        cache, index = self.out / name, self.out / name / CACHE_INDEX
        limit = frames or d.get("cache_frames")
        # the key needs the clip names only: decode the clips when the cache is (re)built, not to check it
        made_from = stage1_cache_key(d.stage1, root, clip_names(root), limit)
        self.out.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.out / f".{name}.lock"):  # torchrun ranks on one machine: one builds, the others reuse
            if index.exists():
                if json.loads(index.read_text()).get("made_from") == made_from:
                    return cache
                log.info("stage-1 cache %s was made from other clips or another stage-1 model: rebuilding", cache)
            (self.out / f"{name}.npz").unlink(missing_ok=True)  # the single-file form of earlier versions
            for old in self.out.glob(f".{name}.tmp-*"):  # left by a killed build
                shutil.rmtree(old, ignore_errors=True)
            tmp = self.out / f".{name}.tmp-{os.getpid()}"
            tmp.mkdir()
            names = self._write_stage1_outputs(root, tmp, limit, name)
            # the index last: a folder without it is incomplete and is rebuilt
            (tmp / CACHE_INDEX).write_text(json.dumps({"made_from": made_from, "names": names}))
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(tmp, cache)
        return cache

    def _write_stage1_outputs(self, root: str | list[str], out: Path, limit: int | None, name: str) -> list[str]:
        """Restore (the first ``limit`` frames of) each clip of ``root`` with the
        stage-1 model into ``out``, clip by clip; the clips' names."""
        from ..data.pairs import PairedClips, save_npy
        from ..infer.restorer import Restorer

        clips = PairedClips(root, 2, 2, dedup=False)
        r = None  # stage 2 alone (data.stage1: none): its inputs are the compressed frames
        if not no_stage1(self.cfg.data.stage1):
            r = Restorer(self.cfg.data.stage1, device=str(self.precision.device), dtype="auto",
                         chunk=int(self.cfg.data.get("chunk", 30)))
        counts = [min(int(limit or len(c.lq)), len(c.lq)) for c in clips.clips]
        pb = self._progress  # minutes of stage-1 inference on a CPU before the first step: show it
        task = pb.add_task(f"stage-1 outputs -> {name}", total=sum(counts), rate="") if pb is not None else None
        for k, (c, n) in enumerate(zip(clips.clips, counts, strict=True)):
            lq = np.array(c.lq[:n])  # a writable copy: the restorer hands frames to torch.from_numpy
            out_lq = lq if r is None else r.restore_frames(lq, sorted(p for p in c.pqfs if p < n))
            save_npy(out / f"input_{k}.npy", out_lq)
            save_npy(out / f"gt_{k}.npy", c.gt[:n])
            log.info("stage-1 cache: %s (%d frames)", c.name, n)
            if task is not None:
                pb.advance(task, n)
        return [c.name for c in clips.clips]

    # -- checkpoints -------------------------------------------------------
    def save_checkpoint(self, name: str = "last.pt") -> Path:
        path = self.ckpt_dir / name
        if self.rank != 0:  # one writer; every rank holds the same weights
            return path
        ck = {"model": self.model.state_dict(), "model_config": json.dumps(self.model.config()),
              "model_arch": self.model.arch_name, "state": dict(self.state),
              "optim": self.optim.state_dict() if self.optim else None,
              "ema": self.ema.state_dict() if self.ema is not None else None, "rng": {"torch": torch.get_rng_state()}}
        tmp = path.with_name(f".{name}.tmp-{os.getpid()}")
        try:
            torch.save(ck, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # full disk, quota, I/O error: keep the previous checkpoint
            tmp.unlink(missing_ok=True)
            raise VrestoreError(f"{path}: could not write the checkpoint ({e}); the previous one is kept, "
                                "free space and resume with --resume") from None
        return path

    def _load_checkpoint(self, path: Path) -> None:
        from ..models.registry import ARCHITECTURES

        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
            raise VrestoreError(f"{path}: unreadable checkpoint ({e})") from None
        cfg = json.loads(ck["model_config"])
        self.model = ARCHITECTURES[ck["model_arch"]].from_config(cfg).train()
        self.model.load_state_dict(ck["model"])
        self.model = self._prepared(self.model)
        self.state.update(ck["state"])
        if ck.get("ema") is not None:
            self.ema = copy.deepcopy(self.model).eval()
            self.ema.load_state_dict(ck["ema"])
        if ck.get("optim") is not None:
            step = self.cfg.steps[self.state["step_idx"]]
            self._make_optimizer(step)
            self.optim.load_state_dict(ck["optim"])
        torch.set_rng_state(ck["rng"]["torch"])
        self._truncate_log(self.state["global_iter"])
        log.info("resumed from %s at iteration %d", path, self.state["global_iter"])

    def _truncate_log(self, upto: int) -> None:
        """Drop log records of iterations after the checkpoint: they will be redone."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln in self.metrics_path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("iter", 0) <= upto]
        tmp = self.metrics_path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in keep))
        os.replace(tmp, self.metrics_path)

    # -- validation ----------------------------------------------------------
    def validate(self) -> float | None:
        from ..data.pairs import FramePairs, PairedClips, to_tensor
        from ..metrics import psnr

        v = self.cfg.get("val")
        if not v or not v.get("data"):
            return None
        model = (self.ema or self.model).eval()
        is_video = hasattr(model, "propagate")
        max_frames = int(v.get("max_frames", 20))
        if "val" not in self._datasets:
            if not is_video and self.cfg.data.get("stage1"):  # stage 2 is judged on what stage 1 hands it
                cache = FramePairs(self._stage1_cache(v.data, "stage1_val_cache", max_frames), patch=0)
                clips = zip(cache.names, cache.inp, cache.gt, strict=True)
                self._datasets["val"] = [(n, x, y, []) for n, x, y in clips]
            else:
                self._datasets["val"] = PairedClips(v.data, 2, 2).validation_clips(max_frames)
        scores: dict[str, float] = {}
        with torch.inference_mode(), self.precision.autocast():
            for name, lq, gt, pqfs in self._datasets["val"]:
                x = to_tensor(lq).to(self.precision.device)
                y = model(x.unsqueeze(0), pqfs=pqfs)[0] if is_video else \
                    torch.cat([model(x[i: i + 1]) for i in range(len(x))])
                out = (y.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
                ps = [psnr(o, g) for o, g in zip(out, gt, strict=True)]
                scores[str(name)] = float(np.mean([p for p in ps if np.isfinite(p)]))
        self.model.train()
        # Kept per clip too: a mean over grey and colour clips hides which of them moved.
        self.val_clips = {n: round(v, 4) for n, v in scores.items()}
        return float(np.mean(list(scores.values())))

    def _val_record(self) -> dict:
        """``val_psnr`` (the mean that picks ``best.pt``) and ``val_psnr_clips`` for a log record."""
        mean = self.validate()
        return {"val_psnr": mean, "val_psnr_clips": self.val_clips} if mean is not None else {"val_psnr": None}

    @property
    def _val_every(self) -> int:
        """Iterations between validations (0: none)."""
        return int(self.cfg.get("val", {}).get("every", 0) or 0)

    def _validate_into(self, rec: dict) -> None:
        """Validate into the log record ``rec``; a new best score saves ``best.pt``."""
        rec.update(self._val_record())
        if rec["val_psnr"] is not None and rec["val_psnr"] > self.state["best_psnr"]:
            self.state["best_psnr"] = rec["val_psnr"]
            self.save_checkpoint("best.pt")

    # -- the loop ------------------------------------------------------------
    def _log(self, rec: dict) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k in ("loss", "lr", "val_psnr"):
                if isinstance(rec.get(k), (int, float)):
                    self.tb.add_scalar(k, rec[k], rec["iter"])
            self.tb.flush()

    def run(self, progress=None) -> Path:
        from ..models import save

        self._progress = progress
        steps = list(self.cfg.steps)
        if self.state["global_iter"] == 0 and self.rank == 0 and self.cfg.get("val", {}).get("at_start", False):
            self._log({"iter": 0, **self._val_record(), "sec": 0.0})  # where the curve starts
        while self.state["step_idx"] < len(steps):
            step = steps[self.state["step_idx"]]
            if not self._run_step(step, progress):
                continue  # recovered into an earlier step
            # Each step's result stays available (e.g. stage 2's denoising pre-training, for transfer).
            if self.rank == 0:
                save(self.ema or self.model, self.ckpt_dir / f"{step.get('name', self.state['step_idx'])}.safetensors")
            self.state["step_idx"] += 1
            self.state["iter_in_step"] = 0
            self.optim = None
            self.save_checkpoint()
        g = self.state["global_iter"]
        if self._val_every and g % self._val_every and self.rank == 0 and self.state.get("final_val") != g:
            # A recipe's last step rarely ends on a validation iteration (a short third step after a long one):
            # without this the weights saved as final.safetensors would never be scored, nor compete for best.pt.
            rec = {"iter": g, "event": "final validation"}
            self._validate_into(rec)
            self._log(rec)
            self.state["final_val"] = g
            self.save_checkpoint()  # a resumed finished run does not validate again
        final = self.out / "final.safetensors"
        if self.rank == 0:
            save(self.ema or self.model, final, {"recipe": self.cfg.name, "iterations": str(self.state["global_iter"])})
        if self.world > 1:
            torch.distributed.barrier()  # the file exists for every rank once run() returns
        return final

    def _run_step(self, step: DictConfig, progress) -> bool:
        """Train one recipe step to its end; False if a divergence recovery
        went back to an earlier step (``run`` then carries on from there)."""
        o = self.cfg.get("optim", {})
        idx, total = self.state["step_idx"], int(step.iters)
        is_video = hasattr(self.model, "propagate")
        flow = step_kind(self.cfg, step) == FLOW_KIND
        if flow and not is_video:
            raise VrestoreError(f"step {step.get('name', idx)}: flow pre-training needs a model with SPyNet")
        if self.state["iter_in_step"] == 0:
            grow = int(step.get("grow", 0))
            if grow:  # new blocks' random init from a fixed seed: data workers and resumes draw on torch's RNG
                torch.manual_seed(self.seed * 1009 + idx)
                self.model.grow(grow)
                if self.ema is not None:
                    self.ema.grow(grow)
                for m in (self.model, self.ema):  # the new blocks' layout; compiled units retrace on their own
                    if m is not None:
                        m.to(memory_format=self._memory_format)
                log.info("grew the reconstruction trunk by %d blocks", grow)
            if flow and self.model.spynet.predicts_zero():
                torch.manual_seed(self.seed * 1009 + idx)  # leave the zero-flow saddle (SPyNet.reset_output_layers)
                self.model.spynet.reset_output_layers()
                if self.ema is not None:
                    self.ema.spynet.load_state_dict(self.model.spynet.state_dict())
        if self.optim is None:
            self._make_optimizer(step)
        if self.ema is None and float(o.get("ema", 0)) > 0:
            self.ema = copy.deepcopy(self.model).eval()
        ema_decay = float(o.get("ema", 0))
        loss_fn = LOSSES[step.get("loss", "charbonnier")]
        data = self._dataset(step)
        batch = int(step.get("batch", self.cfg.data.get("batch", 4)))
        accum = int(step.get("accumulate", o.get("accumulate", 1)))
        if batch % (self.world * accum):
            raise VrestoreError(f"batch {batch} must divide into {self.world} processes x {accum} accumulation "
                                "steps (the recipe's batch is the global batch of one optimiser step)")
        warmup, restarts = float(step.get("warmup", o.get("warmup", 0.1))), int(step.get("restarts", 1))
        freeze = int(o.get("spynet_freeze", 0))
        # SPyNet's freeze counts restoration iterations: flow pre-training steps before this one do not count
        flow_before = sum(int(s.iters) for s in list(self.cfg.steps)[:idx] if step_kind(self.cfg, s) == FLOW_KIND)
        clip = float(o.get("grad_clip", 0) or 0)
        ckpt_every = int(self.cfg.get("checkpoint_every", 100))
        val_every = self._val_every
        bad = 0
        name = step.get("name", f"step{idx}")
        task = progress.add_task(name, total=total, rate="") if progress else None
        while self.state["iter_in_step"] < total:
            batches = self._batches(IterationBatches(data, batch, self.seed, self.rank, self.world, accum),
                                    self.state["global_iter"], total - self.state["iter_in_step"])
            t_last = time.perf_counter()
            for micro in batches:
                it, g = self.state["iter_in_step"], self.state["global_iter"]
                factor = lr_factor(it, total, warmup, restarts) * self.state["lr_scale"]
                for grp in self.optim.param_groups:
                    grp["lr"] = grp["base_lr"] * factor
                if is_video:
                    for p in self.model.spynet.parameters():
                        p.requires_grad_(flow or g - flow_before >= freeze)
                loss, norm = self._step(micro, loss_fn, clip, is_video, flow)
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    bad += 1
                    self.optim.zero_grad(set_to_none=True)
                    self._log({"iter": g, "event": "non-finite loss or gradient; step skipped"})
                    self.state["global_iter"] += 1
                    self.state["iter_in_step"] += 1
                    if bad >= 3:
                        self._recover()
                        bad = 0
                        break  # the data stream restarts at the recovered iteration
                    continue
                bad = 0
                if self.scaler is not None:
                    self.scaler.step(self.optim)
                    self.scaler.update()
                else:
                    self.optim.step()
                if self.ema is not None:
                    d = ema_warmup(ema_decay, g)
                    with torch.no_grad():
                        for pe, pm in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                            pe.lerp_(pm, 1 - d)
                self.state["global_iter"] += 1
                self.state["iter_in_step"] += 1
                g += 1
                now = time.perf_counter()
                rec = {"iter": g, "step": name, "loss": loss, "lr": self.optim.param_groups[0]["lr"],
                       "sec": now - t_last}
                if flow:  # what predicting no motion scores on this batch: the bar the flow must clear
                    rec["zero_flow_epe"] = float(np.mean([float(epe(torch.zeros_like(m[1]), m[1])) for m in micro]))
                if val_every and g % val_every == 0 and self.rank == 0:
                    self._validate_into(rec)
                self._log(rec)
                if g % ckpt_every == 0:
                    self.save_checkpoint()
                if progress is not None:
                    progress.update(task, completed=self.state["iter_in_step"],
                                    rate=f"loss {loss:.4f} {1 / max(rec['sec'], 1e-9):.2f} it/s")
                t_last = time.perf_counter()  # "sec" is the training step alone, not validation or checkpoints
            if self.state["step_idx"] != idx:
                return False
        return True

    def _batches(self, source: IterationBatches, g0: int, n: int) -> Iterable:
        """Batches of iterations g0 .. g0+n-1, made ahead by ``data.workers``
        processes so that cropping and augmentation never stall the step."""
        workers = int(self.cfg.data.get("workers", 0))
        if workers <= 0:
            return (source[g] for g in range(g0, g0 + n))
        return torch.utils.data.DataLoader(source, batch_size=None, sampler=range(g0, g0 + n),
                                           num_workers=workers, prefetch_factor=4)

    def _step(self, micro: list[tuple], loss_fn, clip: float, is_video: bool, flow: bool = False
              ) -> tuple[float, float]:
        """Forward and backward over this process's micro-batches (gradients
        averaged over processes and micro-batches), then clip. Returns (global
        mean loss, gradient norm); both non-finite checks agree on every rank.
        ``flow``: the micro-batches are (frame pairs, known flow) for SPyNet alone."""
        model = self.model if flow else self._wrapped()  # DDP hooks the full forward only: flow grads reduced below
        self.optim.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.precision.device)
        for k, mb in enumerate(micro):
            lq, gt = mb[0].to(self.precision.device), mb[1].to(self.precision.device)
            if self.precision.channels_last and lq.dim() == 4:
                lq = lq.contiguous(memory_format=torch.channels_last)
            sync = k == len(micro) - 1 or self.world == 1 or flow
            with contextlib.nullcontext() if sync else model.no_sync(), self.precision.autocast():
                if flow:
                    out = model.spynet(lq[:, 0], lq[:, 1])
                else:
                    out = model(lq, pqfs=mb[2]) if is_video else model(lq)
                loss = loss_fn(out.float(), gt) / len(micro)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
        if self.world > 1:
            torch.distributed.all_reduce(total)
            total /= self.world
            if flow:
                for p in self.model.spynet.parameters():
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= self.world
        if self.scaler is not None:
            self.scaler.unscale_(self.optim)
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        return float(total), float(norm)

    def _wrapped(self) -> nn.Module:
        """The model as the forward pass sees it: itself, or wrapped in DDP when
        several processes train, rebuilt whenever the set of trained parameters
        changes (growth, SPyNet unfreezing)."""
        if self.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        key = tuple(id(p) for p in self.model.parameters() if p.requires_grad)
        if self._ddp is None or self._ddp_key != key:
            ids = [self.precision.device.index] if self.precision.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(self.model, device_ids=ids, broadcast_buffers=False)
            self._ddp_key = key
        return self._ddp

    def _recover(self) -> None:
        """Repeated non-finite steps: reload the last good checkpoint and halve the learning rate."""
        last = self.ckpt_dir / "last.pt"
        scale = self.state["lr_scale"] * 0.5
        if last.exists():
            self._load_checkpoint(last)
        self.state["lr_scale"] = scale
        self._log({"iter": self.state["global_iter"], "event": f"recovered from {last}; lr scale {scale}"})
        log.warning("training diverged; reloaded %s with learning-rate scale %.3g", last, scale)
