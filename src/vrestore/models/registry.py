"""Architectures and named sizes, registered like timm's models, so a config
file or a checkpoint names what to build."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import VrestoreError

#: architecture name -> class with ``from_config(dict)`` and ``config()``.
ARCHITECTURES: dict[str, type[nn.Module]] = {}
#: model name -> (architecture, config dict)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_arch(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        ARCHITECTURES[name] = cls
        cls.arch_name = name
        return cls

    return deco


def register_model(name: str, arch: str, **config: Any) -> None:
    MODELS[name] = (arch, config)


def build(arch_or_model: str, **overrides: Any) -> nn.Module:
    """Build a registered model by name (``basicvsrpp_c64n7_x4``) or an
    architecture with an explicit config (``basicvsrpp``, mid_channels=...)."""
    if arch_or_model in MODELS:
        arch, cfg = MODELS[arch_or_model]
        cfg = {**cfg, **overrides}
    elif arch_or_model in ARCHITECTURES:
        arch, cfg = arch_or_model, overrides
    else:
        raise VrestoreError(f"unknown model {arch_or_model!r}; known: {', '.join(sorted(MODELS))}")
    return ARCHITECTURES[arch].from_config(cfg)


def list_models() -> list[str]:
    return sorted(MODELS)
