"""Device and precision selection, in one place.

``auto`` picks CUDA when present (bf16 where supported, else fp16), otherwise
the CPU with bf16 autocast when oneDNN has a native bf16 path (AMX or
AVX512-BF16), otherwise fp32.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import VrestoreError

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def cpu_has_fast_bf16() -> bool:
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return amx or native


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype  # compute dtype under autocast (float32 = no autocast)

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def channels_last(self) -> bool:
        return self.device.type == "cpu"

    def __str__(self) -> str:
        return f"{self.device.type} {str(self.dtype).replace('torch.', '')}"


def select(device: str = "auto", dtype: str = "auto") -> Precision:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise VrestoreError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise VrestoreError("--device cuda requested but no CUDA GPU is available")
    if dtype == "auto":
        if dev.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dt = torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    else:
        if dtype not in _DTYPES:
            raise VrestoreError(f"unknown dtype {dtype!r}; use auto, fp32, bf16 or fp16")
        dt = _DTYPES[dtype]
        if dev.type == "cpu" and dt == torch.float16:
            raise VrestoreError("fp16 is not supported on the CPU; use bf16 or fp32")
    return Precision(dev, dt)


def compile_units(model: nn.Module, *, inference: bool = False) -> list[nn.Module]:
    """``torch.compile`` the parts of ``model`` that run as fixed graphs, in place.

    The units are what the model's ``compile_units()`` names (a recurrent
    network: a whole-model compile would unroll its Python loop over frames once
    per clip length), else the whole model. In place (``nn.Module.compile``), so
    parameter names, state dicts and deep copies (the EMA, which stays eager)
    are the plain model's. ``inference`` also freezes the weights into the graph
    (inductor ``freezing``), which only inference may do. Inductor builds C++
    kernels on the CPU, so a compiler must be installed; checked here rather
    than at the first frame.
    """
    if next(model.parameters()).device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise VrestoreError("compiling for the CPU needs a C++ compiler (g++ or clang++) on the PATH; "
                            "install one or run without compiling")
    units = model.compile_units() if hasattr(model, "compile_units") else [model]
    # Units of one class share a code object, and so dynamo's limit of graphs per code object (8): BasicVSR++
    # has 6 residual trunks of different widths, times training and validation, plus growth.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for u in units:
        u.compile(dynamic=False, options={"freezing": True} if inference else {})
    return units


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Serve large tensors from a heap that keeps freed pages mapped.

    glibc hands every block over 32 MB to mmap and unmaps it on free, so each
    large temporary (the DCN's sampled columns, a full-resolution feature map)
    is page-faulted in afresh; on the 2-core VMs we measure on, that costs more
    than the arithmetic (the deformable conv of ``benchmarks/run.py dcn``, fp32,
    grid_sample: 350 ms with glibc's default, 229 ms on the kept heap). Freed blocks are reused
    when the next request fits (not always: aligned requests can leave one a
    little short, and the heap grows instead). The process keeps its peak heap
    until it exits, which suits a command that does one job. glibc only;
    returns whether it applied. ``VRESTORE_MALLOC=system`` leaves it alone.
    """
    import ctypes
    import os
    import sys

    if os.environ.get("VRESTORE_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: nothing to tune
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
