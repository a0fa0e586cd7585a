"""lit-cifar: the classic CIFAR-10 Sequential CNN, trained with PyTorch Lightning."""

from lit_cifar.data import CIFARDataModule
from lit_cifar.errors import UserError
from lit_cifar.module import CIFARClassifier
from lit_cifar.nets import build_net

__all__ = ["CIFARClassifier", "CIFARDataModule", "UserError", "build_net"]
