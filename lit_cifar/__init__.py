"""lit-cifar: the classic CIFAR-10 Sequential CNN, trained with PyTorch Lightning."""

import importlib

from lit_cifar.errors import UserError

# The classes load on first use (PEP 562), so `lit_cifar.errors` alone imports no torch: a script's
# --help and a mistyped flag answer at once.
_LAZY = {
    "CIFARClassifier": "lit_cifar.module",
    "CIFARDataModule": "lit_cifar.data",
    "build_net": "lit_cifar.nets",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lit_cifar' has no attribute {name!r}")


__all__ = ["CIFARClassifier", "CIFARDataModule", "UserError", "build_net"]
