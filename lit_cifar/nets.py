"""The networks, in plain torch (no Lightning here): `build_net("seed")` or `build_net("seed_bn")`.

python -c "from lit_cifar.nets import build_net; print(build_net('seed'))"
"""

from torch import nn


def _seed(num_classes: int) -> nn.Sequential:
    # The seed network exactly: three 5x5 convs with 2x2 max-pooling and no activations.
    # (B, 3, 32, 32) -> (B, 32, 16, 16) -> (B, 32, 8, 8) -> (B, 64, 4, 4) -> (B, 1024) -> (B, C)
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 5, padding=2),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1024, num_classes),
    )


def _seed_bn(num_classes: int) -> nn.Sequential:
    # The seed's unfinished "normalization layers" section: BatchNorm2d + ReLU after each conv.
    # The conv bias is kept so the layer list reads like the seed's; BatchNorm makes it redundant.
    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 5, padding=2), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), *block(32, 64), nn.Flatten(), nn.Linear(1024, num_classes)
    )


NETS = {"seed": _seed, "seed_bn": _seed_bn}


def build_net(name: str, num_classes: int = 10) -> nn.Sequential:
    """Build a network by name; see `NETS` for the choices."""
    if name not in NETS:
        raise ValueError(f"unknown network {name!r}: choose one of {', '.join(NETS)}")
    return NETS[name](num_classes)
