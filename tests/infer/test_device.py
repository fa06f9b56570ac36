"""The kept heap (vrestore.infer.device.keep_freed_memory), checked in child processes."""

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, json
import torch
from vrestore.infer.device import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
big = torch.empty(32 * 2**20).fill_(1.0)  # 128 MB
info = libc.mallinfo2()
mapped, heap = info.hblkhd, info.arena
del big
print(json.dumps({"applied": applied, "mapped": mapped, "heap": heap, "heap_after_free": libc.mallinfo2().arena}))
"""


def _probe(malloc: str) -> dict:
    env = os.environ | {"VRESTORE_MALLOC": malloc}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_kept_heap_serves_large_blocks_and_keeps_them():
    kept, system = _probe("kept"), _probe("system")
    assert kept["applied"] and not system["applied"]
    mb = 2**20
    # glibc's default: a 128 MB block is its own mapping, unmapped on free (paged in afresh next time)
    assert system["mapped"] >= 128 * mb and system["heap"] < 128 * mb
    # kept: it comes from the heap, which keeps the pages after the tensor is freed
    assert kept["mapped"] < 128 * mb <= kept["heap"]
    assert kept["heap_after_free"] >= 128 * mb


def test_compiling_for_the_cpu_without_a_cxx_compiler_says_so(monkeypatch):
    """Inductor builds C++ kernels on the CPU: no compiler is a clear error up front, not a crash mid-video."""
    import shutil

    import torch

    from vrestore.errors import VrestoreError
    from vrestore.infer.device import compile_units

    monkeypatch.setattr(shutil, "which", lambda name: None)
    m = torch.nn.Conv2d(3, 3, 3)
    with pytest.raises(VrestoreError, match="C\\+\\+ compiler"):
        compile_units(m)
    assert m._compiled_call_impl is None
