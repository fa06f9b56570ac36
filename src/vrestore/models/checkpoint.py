"""Load any supported checkpoint into a ready module, and save our own.

Recognised files:
- vrestore safetensors: tensors plus metadata ``vrestore_arch`` and
  ``vrestore_config`` (JSON) naming what to build.
- MMEditing/MMagic BasicVSR++ ``.pth``: ``{"state_dict": {"generator.<key>": ...}}``
  (or a bare backbone state dict); the configuration is inferred from shapes.
- SwinIR ``.pth``: ``{"params" | "params_ema": {...}}``; configuration inferred.

Pickled files are read with ``weights_only=True``: code hidden in a file is
never executed, and such files are refused.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from ..errors import VrestoreError
from .registry import ARCHITECTURES


def _count_indices(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def infer_basicvsrpp_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    mid = sd["backbone.backward_1.main.0.weight"].shape[0]
    num_blocks = _count_indices(sd, r"backbone\.backward_1\.main\.2\.(\d+)\.conv1\.weight")
    low_res = "feat_extract.main.0.weight" in sd
    recon = _count_indices(sd, r"reconstruction\.main\.2\.(\d+)\.conv1\.weight")
    if low_res:
        scale = 4 if sd["upsample2.upsample_conv.weight"].shape[0] == 64 * 4 else 2
    else:
        scale = 1
    return {"mid_channels": mid, "num_blocks": num_blocks, "is_low_res_input": low_res, "scale": scale,
            "num_reconstruction_blocks": recon, "head_sees_input": sd["conv_hr.weight"].shape[1] == 64 + 3}


def infer_swinir_config(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    embed = sd["conv_first.weight"].shape[0]
    in_chans = sd["conv_first.weight"].shape[1]
    n_layers = _count_indices(sd, r"layers\.(\d+)\.")
    depths = [_count_indices(sd, rf"layers\.{i}\.residual_group\.blocks\.(\d+)\.") for i in range(n_layers)]
    heads = [sd[f"layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table"].shape[1]
             for i in range(n_layers)]
    table = sd["layers.0.residual_group.blocks.0.attn.relative_position_bias_table"].shape[0]
    ws = (int(round(table**0.5)) + 1) // 2
    mlp = sd["layers.0.residual_group.blocks.0.mlp.fc1.weight"].shape[0] / embed
    resi = "1conv" if "layers.0.conv.weight" in sd else "3conv"
    cfg: dict[str, Any] = {"in_chans": in_chans, "embed_dim": embed, "depths": depths, "num_heads": heads,
                           "window_size": ws, "mlp_ratio": mlp, "resi_connection": resi,
                           "patch_norm": "patch_embed.norm.weight" in sd}
    mask_key = next((k for k in sd if k.endswith("attn_mask")), None)
    cfg["img_size"] = int(round(sd[mask_key].shape[0] ** 0.5)) * ws if mask_key else 64
    if "conv_before_upsample.0.weight" in sd:
        n_up = _count_indices(sd, r"upsample\.(\d+)\.weight")
        nf = sd["conv_before_upsample.0.weight"].shape[0]
        first = sd["upsample.0.weight"].shape[0]
        cfg.update(upsampler="pixelshuffle", num_feat=nf, upscale=3 if first == 9 * nf else 2 ** ((n_up + 1) // 2))
    elif "upsample.0.weight" in sd:
        cfg.update(upsampler="pixelshuffledirect", upscale=int(round((sd["upsample.0.weight"].shape[0] / in_chans)
                                                                     ** 0.5)))
    else:
        cfg.update(upsampler="", upscale=1)
    return cfg


def _detect(sd: dict[str, torch.Tensor]) -> str | None:
    if "backbone.backward_1.main.0.weight" in sd and any(k.startswith("spynet.") for k in sd):
        return "basicvsrpp"
    if "conv_first.weight" in sd and any(k.startswith("layers.0.residual_group") for k in sd):
        return "swinir"
    return None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise VrestoreError(f"{path}: refused: the file holds pickled objects other than tensors "
                            f"(it could run code when loaded); convert it to safetensors from a trusted "
                            f"environment. ({str(e).splitlines()[0][:160]})") from None
    except Exception as e:  # noqa: BLE001 - a damaged file can fail anywhere inside torch.load
        msg = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise VrestoreError(f"{path}: not a readable PyTorch checkpoint ({msg})") from None


def _published_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise VrestoreError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key in ("params_ema", "params", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            sd = obj[key]
            break
    else:
        sd = obj
    if any(k.startswith("generator.") for k in sd):
        sd = {k[len("generator."):]: v for k, v in sd.items() if k.startswith("generator.")}
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise VrestoreError(f"{path}: the weights dict holds non-tensor values")
    return sd


def _build_and_load(arch: str, cfg: dict[str, Any], sd: dict[str, torch.Tensor], path: Path) -> nn.Module:
    try:
        model = ARCHITECTURES[arch].from_config(cfg)
    except (TypeError, ValueError) as e:
        raise VrestoreError(f"{path}: cannot build {arch} from {cfg}: {e}") from None
    # Buffers we compute ourselves may be absent from a file (SPyNet's mean/std, SwinIR's index).
    own = model.state_dict()
    optional = {k for k in own if k.endswith(("relative_position_index", "spynet.mean", "spynet.std"))}
    missing = [k for k in own if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in own and not k.endswith("attn_mask")]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {wrong[0]})")
        raise VrestoreError(f"{path}: does not match a {arch} with {cfg}: " + "; ".join(parts))
    # Index buffers stored in a file must equal ours (a damaged index would
    # address memory out of range later); weights must be finite.
    for k in optional & set(sd):
        if not sd[k].is_floating_point() and not torch.equal(sd[k].to(own[k].dtype), own[k]):
            raise VrestoreError(f"{path}: {k} differs from the value this architecture defines (damaged file?)")
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise VrestoreError(f"{path}: {bad} holds NaN or infinite values (damaged or diverged checkpoint)")
    try:
        model.load_state_dict(sd, strict=False)
    except (RuntimeError, ValueError) as e:
        raise VrestoreError(f"{path}: {e}") from None
    return model.eval()


def load(path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Load a checkpoint (ours or a published one) as a ready ``nn.Module`` in
    eval mode. ``overrides`` change config fields that weights cannot tell
    (e.g. ``pqf_propagation=True``)."""
    from . import basicvsrpp, swinir  # noqa: F401  registers the architectures

    path = Path(path)
    meta: dict[str, str] = {}
    if not path.is_file():
        from ..weights import bundled_path, unresolved

        bundled = bundled_path(str(path))
        if bundled is None:
            raise unresolved(str(path))
        path = bundled
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise VrestoreError(f"{path}: not a readable safetensors file ({e})") from None
        arch = meta.get("vrestore_arch") or _detect(sd)
        if arch is None:
            raise VrestoreError(f"{path}: unknown weights (no vrestore metadata, not BasicVSR++ or SwinIR keys)")
        cfg = json.loads(meta["vrestore_config"]) if "vrestore_config" in meta else \
            (infer_basicvsrpp_config(sd) if arch == "basicvsrpp" else infer_swinir_config(sd))
    else:
        sd = _published_state_dict(_torch_load(path), path)
        arch = _detect(sd)
        if arch is None:
            sample = ", ".join(list(sd)[:3])
            raise VrestoreError(f"{path}: unknown checkpoint: expected BasicVSR++ (spynet.*, backbone.*) or "
                                f"SwinIR (conv_first, layers.*) keys, found {sample or 'no tensors'}")
        try:
            cfg = infer_basicvsrpp_config(sd) if arch == "basicvsrpp" else infer_swinir_config(sd)
        except KeyError as e:
            raise VrestoreError(f"{path}: incomplete {arch} checkpoint (missing {e})") from None
    cfg.update(overrides)
    model = _build_and_load(arch, cfg, sd, path)
    model.vrestore_meta = meta
    return model


def _default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def save(model: nn.Module, path: str | os.PathLike, extra_meta: dict[str, str] | None = None) -> Path:
    """Write ``model`` as a vrestore safetensors file (atomically)."""
    path = Path(path)
    meta = {"vrestore_arch": model.arch_name, "vrestore_config": json.dumps(model.config()),
            "format": "vrestore-1"}
    meta.update(extra_meta or {})
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(sd, str(tmp), metadata=meta)
        os.chmod(tmp, _default_file_mode())  # safetensors writes 0600; a model file is shared like any other
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        tmp.unlink(missing_ok=True)
        raise VrestoreError(f"{path}: could not write the model ({e}); nothing was replaced") from None
    return path

