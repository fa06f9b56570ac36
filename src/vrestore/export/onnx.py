"""Export stage 1 (BasicVSR++) and stage 2 (SwinIR) to ONNX.

The graphs hold the networks on already padded inputs (``forward_padded``):
padding, cropping and the temporal chunking stay in Python, in the streaming
engine, so one graph serves every frame size.

Stage 1: inputs ``lq`` (1, T, 3, H, W) float32 in [0, 1] and, for models with
PQF propagation, ``pqf`` (T,) float32 (1 marks a peak-quality frame); output
``out`` (1, T, 3, sH, sW).
T is fixed at export, H and W are dynamic (multiples of ``pad_multiple``, at
least ``pad_minimum``). Stage 2: input ``lq`` (1, 3, H, W), H and W dynamic
multiples of the window size; output ``out`` (1, 3, sH, sW).
The file's metadata (``vrestore_*`` keys) says what the graph is: role, task,
scale, T, PQF use, padding and the architecture's configuration.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import VrestoreError

OPSET = 17


class _Stage1Graph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, lq: torch.Tensor, pqf: torch.Tensor) -> torch.Tensor:
        return self.model.forward_padded(lq, pqf)


class _Stage2Graph(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, lq: torch.Tensor) -> torch.Tensor:
        return self.model.forward_padded(lq)


def _role(model: nn.Module) -> str:
    task = getattr(model, "task", None)
    if task == "vsr" and hasattr(model, "forward_padded"):
        return "stage1"
    if task == "image" and hasattr(model, "forward_padded"):
        return "stage2"
    raise VrestoreError(f"{type(model).__name__}: no ONNX export for this architecture "
                        "(stage 1 BasicVSR++ and stage 2 SwinIR are supported)")


def _inputs(model: nn.Module, role: str, frames: int, grow: int = 0) -> tuple[torch.Tensor, ...]:
    """Example inputs at a legal padded size; ``grow`` steps give a second,
    different size (non-square) to check that the graph is not size-bound."""
    mult, minimum = model.pad_sizes()
    h = -(-minimum // mult) * mult + grow * mult
    w = h + (1 + grow) * mult
    g = torch.Generator().manual_seed(0)
    if role == "stage1":
        pqf = torch.zeros(frames)
        pqf[:: model.cfg.pqf_period] = 1.0
        return torch.rand(1, frames, 3, h, w, generator=g), pqf
    return (torch.rand(1, 3, h, w, generator=g),)


def _failing_layer(model: nn.Module, graph: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int) -> str | None:
    """Name the innermost sub-module that cannot be exported on its own, by
    recording each module's tensor inputs once and trying the deepest first."""
    seen: dict[str, tuple[nn.Module, tuple]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def pre(m, args, _n=name):
            if _n not in seen and args and all(isinstance(a, torch.Tensor) for a in args):
                seen[_n] = (m, tuple(a.detach() for a in args))
        hooks.append(mod.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            graph(*inputs)
    except Exception:  # noqa: BLE001 - the modules reached before the failure are recorded
        pass
    finally:
        for h in hooks:
            h.remove()
    for name in sorted(seen, key=lambda n: -n.count(".")):
        mod, args = seen[name]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(mod, args, io.BytesIO(), opset_version=opset, dynamo=False)
        except Exception:  # noqa: BLE001
            return f"{name} ({type(mod).__name__})"
    return None


def export_onnx(model: nn.Module | str | os.PathLike, path: str | os.PathLike, *, frames: int = 32,
                opset: int = OPSET, check: bool = True, tolerance: float = 1e-3) -> dict[str, str]:
    """Write ``model`` (a module, a checkpoint path or a bundled name) as an
    ONNX file; ``frames`` is the stage-1 chunk length T. The file is written
    under a temporary name, checked with ONNX Runtime against the torch model
    at a second frame size (``tolerance``, max abs), and renamed only then.
    Returns the metadata stored in the file."""
    if not isinstance(model, nn.Module):
        from ..models.checkpoint import load

        model = load(model)
    model = model.float().eval()
    role = _role(model)
    if role == "stage1" and frames < 2:
        raise VrestoreError(f"stage 1 needs at least 2 frames per chunk (got --frames {frames})")
    graph = _Stage1Graph(model) if role == "stage1" else _Stage2Graph(model)
    inputs = _inputs(model, role, frames)
    names_in = ["lq", "pqf"] if role == "stage1" else ["lq"]
    axes = {"lq": {3: "height", 4: "width"}, "out": {3: "out_height", 4: "out_width"}} if role == "stage1" else \
        {"lq": {2: "height", 3: "width"}, "out": {2: "out_height", 3: "out_width"}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, inputs, str(tmp), opset_version=opset, dynamo=False, input_names=names_in,
                                  output_names=["out"], dynamic_axes=axes)
        except Exception as e:  # noqa: BLE001 - any exporter failure becomes one clear error
            layer = _failing_layer(model, graph, inputs, opset)
            where = f"layer {layer}" if layer else "the model"
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise VrestoreError(f"cannot export {role} to ONNX opset {opset}: {where} failed: {first}") from None
        meta = _metadata(model, role, frames, opset)
        _write_metadata(tmp, meta)
        if check:
            _check(tmp, graph, model, role, frames, tolerance)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return meta


def _metadata(model: nn.Module, role: str, frames: int, opset: int) -> dict[str, str]:
    from .. import __version__

    mult, minimum = model.pad_sizes()
    cfg = model.config()
    meta: dict[str, Any] = {
        "role": role, "arch": getattr(model, "arch_name", type(model).__name__.lower()),
        "config": json.dumps(cfg), "scale": getattr(model, "scale", 1), "pad_multiple": mult,
        "pad_minimum": minimum, "opset": opset, "version": __version__,
    }
    if role == "stage1":
        meta.update(frames=frames, task="qe" if model.scale == 1 else f"x{model.scale}",
                    pqf_propagation=int(bool(cfg.get("pqf_propagation"))), pqf_period=cfg.get("pqf_period", 4),
                    inputs="lq (1,T,3,H,W) float32 [0,1]; pqf (T,) float32 0/1", outputs="out (1,T,3,sH,sW)")
    else:
        meta.update(task="image", inputs="lq (1,3,H,W) float32 [0,1]", outputs="out (1,3,sH,sW)")
    return {f"vrestore_{k}": str(v) for k, v in meta.items()}


def _write_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    for k, v in meta.items():
        prop = m.metadata_props.add()
        prop.key, prop.value = k, v
    m.producer_name = "vrestore"
    onnx.checker.check_model(m)
    onnx.save(m, str(path))


def _check(path: Path, graph: nn.Module, model: nn.Module, role: str, frames: int, tolerance: float) -> None:
    """Compare ONNX Runtime with torch at a size other than the traced one."""
    from ..infer.onnx_backend import OnnxModel

    inputs = _inputs(model, role, frames, grow=1)
    got = OnnxModel(path)._run(**dict(zip(["lq", "pqf"], inputs, strict=False)))
    with torch.no_grad():
        want = graph(*inputs)
    err = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    if not err <= tolerance:
        raise VrestoreError(f"exported {role} does not reproduce the torch model at another frame size "
                            f"(max abs difference {err:.3g} > {tolerance}); the file was not written")


def cache_dir() -> Path:
    base = os.environ.get("VRESTORE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vrestore")
    return Path(base) / "onnx"


def ensure_onnx(spec: str | os.PathLike, frames: int = 32) -> Path:
    """An ONNX file for a checkpoint path or bundled name: exported once into
    the cache (keyed by the file's content, T and the opset), then reused."""
    from ..weights import bundled_path, unresolved

    p = Path(spec)
    if not p.is_file():
        b = bundled_path(str(spec))
        if b is None:
            raise unresolved(str(spec))
        p = b
    digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    out = cache_dir() / f"{p.stem}-{digest}-T{frames}-op{OPSET}.onnx"
    if not out.exists():
        export_onnx(p, out, frames=frames)
    return out
