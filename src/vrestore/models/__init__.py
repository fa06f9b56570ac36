"""Networks (one architecture per file), their registry and checkpoint I/O."""

from . import basicvsrpp, swinir  # noqa: F401  (register architectures and sizes)
from .basicvsrpp import BasicVSRPlusPlus
from .checkpoint import load, save
from .dcn import ModulatedDeformConv2d, modulated_deform_conv2d
from .registry import build, list_models
from .spynet import SPyNet, flow_warp
from .swinir import SwinIR

__all__ = ["BasicVSRPlusPlus", "ModulatedDeformConv2d", "SPyNet", "SwinIR", "build", "flow_warp", "list_models",
           "load", "modulated_deform_conv2d", "save"]
