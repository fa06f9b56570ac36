"""ONNX Runtime backend: an exported stage-1 or stage-2 graph, callable like
the torch module it came from, so the restorer's streaming, tiling, TTA and
video I/O run unchanged on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import VrestoreError
from ..models.basicvsrpp import pad_frames


def _mirror(t: int, frames: int) -> list[int]:
    """Indices 0..t-1 then reflected back and forth to fill ``frames`` slots."""
    if t == 1:
        return [0] * frames
    period = 2 * t - 2
    return [i % period if i % period < t else period - i % period for i in range(frames)]


class OnnxModel:
    """Runs a ``vrestore export`` file with ONNX Runtime (CPU, or CUDA when
    the device is CUDA and onnxruntime-gpu is installed).

    Stage 1 takes any clip length up to the exported T: shorter clips are
    filled by mirroring frames in time (only clips shorter than T frames in
    total are affected; the streaming engine feeds full windows otherwise)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise VrestoreError("the onnxruntime backend needs onnxruntime: pip install 'vrestore[onnx]'") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise VrestoreError(f"{self.path}: no such ONNX file")
        opts = ort.SessionOptions()
        # The unrolled recurrent graph has tens of thousands of nodes; ORT's
        # buffer-reuse planner is superlinear in them (minutes at T=48) while
        # tensors are still freed after their last use without it.
        opts.enable_mem_reuse = False
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise VrestoreError(f"{self.path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self._inputs = {i.name for i in self.session.get_inputs()}
        self.role = meta.get("vrestore_role")
        if self.role not in ("stage1", "stage2"):
            raise VrestoreError(f"{self.path}: not a vrestore export (no vrestore_role metadata); "
                                "export models with `vrestore export`")
        self.meta = meta
        self.task = "vsr" if self.role == "stage1" else "image"
        self.scale = int(meta["vrestore_scale"])
        self.multiple, self.minimum = int(meta["vrestore_pad_multiple"]), int(meta["vrestore_pad_minimum"])
        self.frames = int(meta.get("vrestore_frames", 0))
        self.pqf_period = int(meta.get("vrestore_pqf_period", 4))
        self.arch_name = meta.get("vrestore_arch", "onnx")
        self._config = json.loads(meta.get("vrestore_config", "{}"))

    def config(self) -> dict:
        return dict(self._config)

    def __repr__(self) -> str:
        return f"OnnxModel({self.path.name}, {self.role}, scale={self.scale}, frames={self.frames})"

    def _run(self, **feed: torch.Tensor) -> torch.Tensor:
        arrays = {k: v.detach().float().cpu().contiguous().numpy() for k, v in feed.items() if k in self._inputs}
        return torch.from_numpy(self.session.run(None, arrays)[0])

    def __call__(self, x: torch.Tensor, pqfs: list[int] | None = None) -> torch.Tensor:
        s = self.scale
        if self.role == "stage2":
            if x.dim() != 4:
                raise ValueError(f"stage 2 expects (N, 3, H, W), got {tuple(x.shape)}")
            h, w = x.shape[-2:]
            padded = pad_frames(x.unsqueeze(1), self.multiple, self.minimum)[:, 0]
            out = torch.cat([self._run(lq=padded[i: i + 1]) for i in range(x.shape[0])])
            return out[..., : h * s, : w * s].to(x.device)
        if x.dim() != 5:
            raise ValueError(f"stage 1 expects (N, T, 3, H, W), got {tuple(x.shape)}")
        n, t, _, h, w = x.shape
        if t > self.frames:
            raise VrestoreError(f"{self.path.name} was exported for {self.frames} frames per chunk; got {t} "
                                f"(use --chunk {self.frames} or export with --frames {t})")
        idx = _mirror(t, self.frames)
        pqf_set = set(range(0, t, self.pqf_period) if pqfs is None else pqfs)
        mask = torch.tensor([1.0 if i in pqf_set else 0.0 for i in idx])
        padded = pad_frames(x[:, idx], self.multiple, self.minimum)
        out = torch.cat([self._run(lq=padded[i: i + 1], pqf=mask) for i in range(n)])
        return out[:, :t, :, : h * s, : w * s].to(x.device)
