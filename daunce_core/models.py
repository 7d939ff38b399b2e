"""Models with one constructor interface: ``build_model(cfg, in_shape, num_classes)``.

``model.arch`` is ``mlp``, ``resnet9``, a torchvision classification model by name (``resnet18``,
built untrained with the data's number of classes) or a factory by import path
(``package.module:function``, called as ``function(in_shape, num_classes)``: the input shape,
(C, H, W) or (d,), and the number of classes; docs/inputs.md).
Models with BatchNorm are trained under vmap from scratch too (BatchNorm in train mode, the
running statistics carried as state) and fine-tuned with theta_0's statistics or, with
``daunce.batchnorm: train``, minibatch statistics, whichever way they were named (see
daunce_core/ensemble.py). A model that cannot be vmapped is trained one by one (:func:`fit_mode`).
"""
from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable

import torch
from torch import nn

from .config import ModelConfig

log = logging.getLogger(__name__)


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


class ModelError(ValueError):
    """``model.arch`` names no model that can be built; the message says why."""


_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def resolve_factory(path: str) -> Callable:
    """The callable ``package.module:function`` names, checked to take ``(in_shape, num_classes)``
    (:func:`inspect.signature`); it is not called. The workflow calls this when it is parsed.

    Raises:
        ModelError: one line naming ``model.arch`` and what is wrong (import, attribute, signature).
    """
    if not _IMPORT_PATH.match(path):
        raise ModelError(f"model.arch: {path!r} is not an import path 'package.module:function'")
    module_name, attr = path.split(":")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:  # ModuleNotFoundError, or an error inside the user's module
        raise ModelError(f"model.arch: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
                         "is it installed or on PYTHONPATH?") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelError(f"model.arch: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"model.arch: {path} is a {type(obj).__name__}, not a callable factory")
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: the call will tell
        return obj
    try:
        sig.bind((1, 1, 1), 2)
    except TypeError as exc:
        raise ModelError(f"model.arch: {path}{sig} cannot be called as {attr}(in_shape, num_classes) ({exc}); "
                         "the factory takes the input shape, a tuple (C, H, W) for images or (d,) for "
                         "tabular data, and the number of classes, and returns a torch.nn.Module "
                         "(docs/inputs.md)") from exc
    return obj


def from_import_path(path: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``package.module:function`` called as ``function(in_shape, num_classes)``; it returns the model.

    The module must be importable by every job (installed, or on ``PYTHONPATH``).
    """
    factory = resolve_factory(path)
    shape = tuple(int(s) for s in in_shape)
    try:
        model = factory(shape, int(num_classes))
    except Exception as exc:  # the user's factory failed on these arguments: say which
        raise ModelError(f"model.arch: {path}(in_shape={shape}, num_classes={int(num_classes)}) raised "
                         f"{type(exc).__name__}: {' '.join(str(exc).split())}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"model.arch: {path}(in_shape, num_classes) returned a {type(model).__name__}, "
                         "not a torch.nn.Module")
    return model


class _GrayToRGB(nn.Module):
    """Feeds one-channel images to a model made for three (torchvision's classifiers)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.expand(-1, 3, -1, -1))


def torchvision_model(name: str, in_shape: tuple[int, ...], num_classes: int) -> nn.Module | None:
    """torchvision's classification model ``name`` (``resnet18``, ...), untrained, or None if unknown.

    Grayscale inputs are repeated to three channels; the first layer then stays torchvision's.
    """
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        return None
    channels = int(in_shape[0]) if len(in_shape) == 3 else 0
    if channels not in (1, 3):
        raise ModelError(f"model.arch: torchvision's {name} takes images [3, H, W]; the data have {tuple(in_shape)}")
    model = torchvision.models.get_model(name, weights=None, num_classes=int(num_classes))
    return _GrayToRGB(model) if channels == 1 else model


def can_vmap(module: nn.Module, example: torch.Tensor | None = None, *,
             train_mode: bool = False) -> tuple[bool, str]:
    """Whether copies of ``module`` can be trained together under ``torch.func.vmap``.

    Hooks rule it out at once; given ``example`` inputs [B, ...], two stacked copies (parameters
    and buffers) also run forward and backward under vmap, which catches in-place writes into
    unbatched tensors, ``.item()``, random ops and the like. BatchNorm in train mode passes: its
    running statistics are per-model buffers here as in the trainer
    (``ensemble.forward_with_state``); with ``momentum=None`` it reads ``float()`` of a batched
    counter and fails. Returns (ok, reason); the reason is one line for a notice.
    """
    from torch.func import functional_call, vmap

    for name, m in module.named_modules():
        hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                             "_backward_pre_hooks") if getattr(m, h, None)]
        if hooks:
            return False, f"{name or type(m).__name__} has {hooks[0].strip('_').replace('_', ' ')}"
    if example is None:
        return True, "no hooks (not run on an input)"
    was_training = module.training
    module.train(train_mode)
    try:
        params = {k: torch.stack([v.detach()] * 2).requires_grad_(True) for k, v in module.named_parameters()}
        buffers = {k: torch.stack([v.detach()] * 2) for k, v in module.named_buffers()}
        xb = torch.stack([example] * 2)
        out = vmap(lambda p, b, x: functional_call(module, (p, b), (x,)), in_dims=(0, 0, 0))(params, buffers, xb)
        out.float().sum().backward()
    except Exception as exc:  # noqa: BLE001 -- any failure means: fit one by one
        return False, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    finally:
        module.train(was_training)
    return True, "ran forward and backward under vmap"


def fit_mode(module: nn.Module, example: torch.Tensor | None = None, *, train_mode: bool = False,
             what: str = "fit") -> str:
    """``"vmap"`` when :func:`can_vmap` accepts ``module``, else ``"loop"`` with a logged notice.

    The loop trains the same models with the same draws, schedule and optimiser, one at a time
    (daunce_core/ensemble.py), so the choice changes the speed, not the randomness.
    """
    ok, reason = can_vmap(module, example, train_mode=train_mode)
    if ok:
        return "vmap"
    log.warning("%s: %s cannot be vmapped (%s); fitting the models one by one, with the same "
                "randomness", what, type(module).__name__, reason)
    return "loop"


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Construct the model named by ``cfg.arch`` for inputs of shape ``in_shape`` (C, H, W)."""
    if cfg.arch == "mlp":
        in_features = 1
        for s in in_shape:
            in_features *= int(s)
        return MLP(in_features, [int(h) for h in cfg.hidden], num_classes)
    if len(in_shape) == 1 and ":" not in cfg.arch:  # feature vectors [n, d] (an npz of tabular data)
        raise ModelError(f"model.arch: {cfg.arch} takes images [C, H, W] but the data are feature vectors of "
                         f"{int(in_shape[0])} values; use 'mlp' or a factory 'package.module:function'")
    if cfg.arch == "resnet9":
        return ResNet9(num_classes, in_channels=int(in_shape[0]), width=cfg.width)
    if ":" in cfg.arch:
        return from_import_path(cfg.arch, in_shape, num_classes)
    model = torchvision_model(cfg.arch, in_shape, num_classes)
    if model is not None:
        return model
    raise ModelError(f"model.arch: unknown architecture {cfg.arch!r}; choose 'mlp', 'resnet9', a torchvision "
                     "model name (resnet18, ...) or an import path 'package.module:function'")


def model_factory(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> Callable[[], nn.Module]:
    """A constructor of fresh models of ``cfg`` (theta_0, every retrain, every perturbed fit).

    Retrains seed torch before each call, so the factory (not a built model) is what they take.
    """
    return lambda: build_model(cfg, in_shape, num_classes)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """``state`` (theta_0) checked against ``model``'s own state dict; float tensors cast to its dtypes.

    Like ``model.load_state_dict(state, strict=True)``, a missing or extra key or another shape
    is refused, so that no parameter silently keeps its random initialisation; also refused are
    NaN or infinite values and numbers of another kind (floats for integer buffers or back).
    Float tensors of another precision (a float64 theta_0) are cast to the model's, as
    ``load_state_dict`` copies them. The :class:`ModelError` names ``source`` and the first
    differing key, in the model's order.
    """
    ref = model.state_dict()
    hint = "use the theta_0 trained for this config's model and data (the base rule's output)"
    missing = [k for k in ref if k not in state]
    extra = [k for k in state if k not in ref]
    if missing or extra:
        what = (f"lacks key {missing[0]!r} of the model" if missing
                else f"has key {extra[0]!r}, which the model lacks")
        raise ModelError(f"{source}: theta_0 does not fit the model ({type(model).__name__}; "
                         f"{len(missing)} keys missing, {len(extra)} unknown): it {what}; {hint}")
    out = {}
    for key, want in ref.items():
        have = state[key]
        if tuple(have.shape) != tuple(want.shape):
            raise ModelError(f"{source}: theta_0 key {key!r} has shape {list(have.shape)}, the model "
                             f"{list(want.shape)} (another width or number of classes?); {hint}")
        if have.dtype.is_floating_point != want.dtype.is_floating_point:
            raise ModelError(f"{source}: theta_0 key {key!r} is {have.dtype}, the model's is {want.dtype}; {hint}")
        if have.dtype.is_floating_point and not bool(torch.isfinite(have).all()):
            raise ModelError(f"{source}: theta_0 key {key!r} holds NaN or infinite values (its training "
                             "diverged?); retrain theta_0 with a lower base.lr")
        out[key] = have.to(want.dtype)
    return out
