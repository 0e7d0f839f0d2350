"""Model registry (CIFAR ResNets, small MLP/CNNs) and the flat-parameter wrapper.

BatchNorm decision: the parameter server keeps and updates only the *trainable* parameters, as one flat
float32 vector (`FlatModel.params`). BatchNorm running statistics are buffers, not parameters: they are never
sent, averaged or stored by the server; whoever evaluates a parameter vector recomputes them at it
(common/evaluation.py: `recompute_bn_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ormo_ps.common.registry import call_imported, is_import_path, resolve

ModelFactory = Callable[[int, tuple[int, ...]], nn.Module]


# --------------------------------------------------------------------------------------------- CIFAR ResNets


class _OptionAShortcut(nn.Module):
    """He et al.'s option A: identity with stride-2 subsampling and zero-padded extra channels (no parameters)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_planes - in_planes
        self.pad_before = extra // 2
        self.pad_after = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_before or self.pad_after:
            # F.pad pads dimensions from the last one backwards: (W, W, H, H, C, C).
            x = F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))
        return x


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al. 2016, Fig. 2 left)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = _OptionAShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (He et al. 2016, Sec. 4.2): 16/32/64 channels, n blocks per stage."""

    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        # Adaptive pooling keeps the model usable on inputs smaller than 32x32 (the 8x8 digits).
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """The CIFAR ResNet of the given depth; depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"depth must be of the form 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes, in_channels)


# ------------------------------------------------------------------------------------------------ small models


class MLP(nn.Module):
    """Flatten, one hidden layer of 128 ReLU units, linear output: the fastest model for smoke runs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def image_shape(input_shape: tuple[int, ...], model: str, min_size: int = 1) -> tuple[int, int, int]:
    """(C, H, W) of an image input shape, checked for `model`: ValueError naming the model otherwise."""
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W) for {model}, got {input_shape}")
    channels, height, width = input_shape
    if height < min_size or width < min_size:
        raise ValueError(f"input_shape must be at least {min_size}x{min_size} for {model}, got {input_shape}")
    return channels, height, width


class SmallCNN(nn.Module):
    """Two conv(3x3)-ReLU-maxpool(2) layers and a linear classifier, for 3x32x32 or 1x8x8 inputs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = image_shape(input_shape, "small-cnn", min_size=4)
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3, padding=1)
        self.linear = nn.Linear(64 * (height // 4) * (width // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        return self.linear(out.flatten(1))


class StridedCNN(nn.Module):
    """Two strided conv-ReLU layers (5x5/2 with 16 channels, 3x3/2 with 32) and a linear classifier: a CNN
    that computes a batch-32 CIFAR gradient in about 2.9 ms on one CPU core (small-cnn: 26 ms), for
    studies of many long runs on a CPU (bench/convergence.py --variant k64)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        channels, height, width = image_shape(input_shape, "strided-cnn", min_size=4)
        self.conv1 = nn.Conv2d(channels, 16, kernel_size=5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.linear = nn.Linear(32 * ((height + 3) // 4) * ((width + 3) // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return self.linear(out.flatten(1))


# ------------------------------------------------------------------------------------------------- registry


def _resnet_factory(depth: int) -> ModelFactory:
    def build(num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
        return cifar_resnet(depth, num_classes, image_shape(input_shape, f"resnet{depth}")[0])

    return build


MODELS: dict[str, ModelFactory] = {
    **{f"resnet{depth}": _resnet_factory(depth) for depth in (20, 32, 44, 56, 110)},
    "mlp": lambda num_classes, input_shape: MLP(input_shape, num_classes),
    "small-cnn": lambda num_classes, input_shape: SmallCNN(input_shape, num_classes),
    "strided-cnn": lambda num_classes, input_shape: StridedCNN(input_shape, num_classes),
}


# `--model client`: the run names no model; the first client that registers brings its own (layout and w_0).
FROM_CLIENT = "client"


def resolve_model(name: str) -> ModelFactory:
    """The factory of a registered name or of an import path (`my_pkg.models:build`, imported here); a
    ValueError saying what is wrong otherwise (unknown name, module not found, attribute missing)."""
    return resolve(MODELS, name, "model")


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32)) -> nn.Module:
    """Build a registered model or the one an import path names: a callable taking (num_classes, input_shape),
    or nothing, and returning a `torch.nn.Module`. Its initial parameters come from torch's global RNG
    (`torch.manual_seed`)."""
    factory = resolve_model(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    input_shape = tuple(int(d) for d in input_shape)
    if not input_shape or any(d < 1 for d in input_shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {input_shape}")
    if not is_import_path(name):
        return factory(num_classes, input_shape)
    module = call_imported(factory, name, "model", (num_classes, input_shape), "(num_classes, input_shape)")
    if not isinstance(module, nn.Module):
        raise ValueError(f"model {name!r} returned a {type(module).__name__}; expected a torch.nn.Module")
    return module


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameter elements (what the server stores), excluding buffers."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------------ FlatModel


class FlatModel:
    """A module whose trainable parameters are views into one flat float32 vector, and their grads too.

    `params` and `grads` are live: writing `params` changes the model, and `backward()` accumulates into
    `grads`. This lets the worker send/receive the whole model as one tensor without copying layer by layer.
    """

    def __init__(self, module: nn.Module, device: torch.device | str | None = None) -> None:
        if device is not None:
            module = module.to(device)
        self.module = module
        self._trainable = [p for p in module.parameters() if p.requires_grad]
        if not self._trainable:
            raise ValueError("module has no trainable parameters")
        devices = {p.device for p in self._trainable}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device, found {sorted(map(str, devices))}")
        dtypes = {p.dtype for p in self._trainable}
        if dtypes != {torch.float32}:
            raise ValueError(f"all parameters must be float32, found {sorted(map(str, dtypes))}")
        (self.device,) = devices
        self.numel = sum(p.numel() for p in self._trainable)
        self._offsets: list[int] = []
        self._params = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        self._grads = torch.zeros(self.numel, dtype=torch.float32, device=self.device)
        offset = 0
        for p in self._trainable:
            self._offsets.append(offset)
            self._params[offset : offset + p.numel()].copy_(p.detach().flatten())
            offset += p.numel()
        for i in range(len(self._trainable)):
            self._attach_param(i)
            self._attach_grad(i, keep_value=True)

    def _slot(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self._trainable[i]
        return flat[self._offsets[i] : self._offsets[i] + p.numel()].view_as(p)

    def _attach_param(self, i: int) -> None:
        self._trainable[i].data = self._slot(self._params, i)

    def _attach_grad(self, i: int, keep_value: bool) -> None:
        p = self._trainable[i]
        slot = self._slot(self._grads, i)
        if keep_value and p.grad is not None:
            slot.copy_(p.grad)
        elif not keep_value:
            slot.zero_()
        p.grad = slot

    def _reattach(self) -> None:
        # Autograd accumulates in place into an existing .grad, but `zero_grad(set_to_none=True)` (the
        # default of nn.Module and torch.optim) or an assignment replaces it; re-point such tensors here
        # instead of silently reading stale values.
        for i, p in enumerate(self._trainable):
            expected = self._params.data_ptr() + self._offsets[i] * 4
            if p.data_ptr() != expected:
                self._params[self._offsets[i] : self._offsets[i] + p.numel()].copy_(p.detach().flatten())
                self._attach_param(i)
            expected = self._grads.data_ptr() + self._offsets[i] * 4
            if p.grad is None:
                self._attach_grad(i, keep_value=False)
            elif p.grad.data_ptr() != expected:
                self._attach_grad(i, keep_value=True)

    @property
    def params(self) -> torch.Tensor:
        """The flat parameter vector (a live view of the model's parameters)."""
        self._reattach()
        return self._params

    @property
    def grads(self) -> torch.Tensor:
        """The flat gradient vector (a live view of every parameter's `.grad`)."""
        self._reattach()
        return self._grads

    def load_(self, vec: torch.Tensor) -> None:
        """Copy a flat float32 vector of `numel` elements into the parameters."""
        if not isinstance(vec, torch.Tensor):
            raise TypeError(f"vec must be a torch.Tensor, got {type(vec).__name__}")
        if vec.numel() != self.numel:
            raise ValueError(f"vec has {vec.numel()} elements, the model has {self.numel} parameters")
        if vec.dtype != torch.float32:
            raise ValueError(f"vec must be float32, got {vec.dtype}")
        with torch.no_grad():
            self.params.copy_(vec.reshape(-1))

    def zero_grad_(self) -> None:
        """Zero all gradients in place, keeping them attached to the flat buffer."""
        self.grads.zero_()


# ------------------------------------------------------------------------------------------ BN recalibration
