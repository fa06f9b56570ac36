"""vrestore: restore compressed video with BasicVSR++ and SwinIR (the NTIRE 2022 two-stage recipe)."""

from .errors import VrestoreError

__version__ = "0.1.0"


def load(path, **overrides):
    """Load a checkpoint (vrestore safetensors, MMEditing BasicVSR++, SwinIR) as an eval-mode module."""
    from .models.checkpoint import load as _load

    return _load(path, **overrides)


def __getattr__(name):
    if name == "Restorer":
        from .infer.restorer import Restorer

        return Restorer
    raise AttributeError(name)


__all__ = ["Restorer", "VrestoreError", "load", "__version__"]
