"""lit-cifar: the classic CIFAR-10 Sequential CNN, trained with PyTorch Lightning."""

import importlib

from lit_cifar.errors import UserError

# Each name loads lit_cifar.<module> on first use (PEP 562): `lit_cifar.errors` alone imports no torch.
_LAZY = {"CIFARClassifier": "module", "CIFARDataModule": "data", "build_net": "nets"}
__all__ = ["UserError", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lit_cifar' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lit_cifar.{_LAZY[name]}"), name)
