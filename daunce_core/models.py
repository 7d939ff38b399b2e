"""Models with one constructor interface: ``build_model(cfg, in_shape, num_classes)``."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .config import ModelConfig


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) x len(hidden) -> Linear. The embedded default's model."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, padding: int | None = None) -> nn.Sequential:
    padding = k // 2 if padding is None else padding
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=False))


class _Residual(nn.Module):
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.module(x)


class ResNet9(nn.Module):
    """The CIFAR-10 ResNet-9 of the ffcv example, used by TRAK's and later LDS benchmarks.

    conv(64) -> conv(128, k5, s2) -> res(128) -> conv(256) -> maxpool -> res(256)
    -> conv(128, padding 0) -> global max-pool -> linear, logits scaled by 0.2 (as in ffcv's recipe).

    Layer for layer the ``construct_model`` of ffcv's ``examples/cifar/train_cifar.py``, which
    TRAK's CIFAR-10 benchmark and the DAUNCE authors' ``construct_rn9`` also use: in particular
    the last conv has no padding, so a 32x32 image reaches the global max-pool as a 6x6 map
    (8x8 with padding 1). Inputs must be at least 11x11 (the last conv needs a 3x3 map).
    tests/test_resnet9.py pins the parameter count and that shape.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0):
        super().__init__()
        c = lambda v: max(8, int(v * width))  # noqa: E731
        self.net = nn.Sequential(
            _conv_bn(in_channels, c(64)),
            _conv_bn(c(64), c(128), k=5, stride=2),
            _Residual(nn.Sequential(_conv_bn(c(128), c(128)), _conv_bn(c(128), c(128)))),
            _conv_bn(c(128), c(256)),
            nn.MaxPool2d(2),
            _Residual(nn.Sequential(_conv_bn(c(256), c(256)), _conv_bn(c(256), c(256)))),
            _conv_bn(c(256), c(128), k=3, padding=0),  # ffcv: padding=0 (the 6x6 map above)
            nn.AdaptiveMaxPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(c(128), num_classes, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 0.2


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Construct the model named by ``cfg.arch`` for inputs of shape ``in_shape`` (C, H, W)."""
    if cfg.arch == "mlp":
        in_features = 1
        for s in in_shape:
            in_features *= int(s)
        return MLP(in_features, [int(h) for h in cfg.hidden], num_classes)
    if cfg.arch == "resnet9":
        return ResNet9(num_classes, in_channels=int(in_shape[0]), width=cfg.width)
    raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}; choose 'mlp' or 'resnet9'")


def model_factory(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> Callable[[], nn.Module]:
    """A constructor of fresh models of ``cfg`` (theta_0, every retrain, every perturbed fit).

    Retrains seed torch before each call, so the factory (not a built model) is what they take.
    """
    return lambda: build_model(cfg, in_shape, num_classes)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
