"""ResNet-50 for the GPU bench: torchvision's where it is importable, else the same network
written out here (Bottleneck blocks [3, 4, 6, 3], 25,557,032 parameters, as torchvision's
``resnet50``). Random init either way: the bench measures serving, not accuracy.

``package(device, batch)`` compiles it with AOTInductor (``aotiserve pack``'s ``pack``)
for a static [batch, 3, 224, 224] float32 input, once per torch version, source and
arguments, into ``.cache/bench/``.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "bench"


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, 3)
        self.layer2 = self._layer(128, 4, stride=2)
        self.layer3 = self._layer(256, 6, stride=2)
        self.layer4 = self._layer(512, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def model() -> tuple[nn.Module, str]:
    """(ResNet-50 with random weights, where it came from)."""
    torch.manual_seed(0)
    try:
        import torchvision

        return torchvision.models.resnet50(
            weights=None
        ), f"torchvision {torchvision.__version__} resnet50"
    except ImportError:
        return ResNet50(), "bench/resnet.py ResNet50 (torchvision not importable)"


def package(device: str = "cuda", batch: int = 8) -> tuple[Path, str]:
    """(path of the compiled .pt2 for [batch, 3, 224, 224] float32 on ``device``, source)."""
    from aotiserve.server.packaging import pack

    net, source = model()
    key = hashlib.sha256(
        repr(
            (
                torch.__version__,
                source,
                device,
                batch,
                inspect.getsource(ResNet50) if "bench/" in source else "",
            )
        ).encode()
    )
    path = CACHE / f"resnet50-{device.split(':')[0]}-b{batch}-{key.hexdigest()[:12]}.pt2"
    if path.exists():
        return path, source
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        tmp_path = Path(tmp) / path.name
        net = net.eval().to(device)
        pack(net, (torch.randn(batch, 3, 224, 224, device=device),), tmp_path)
        os.replace(tmp_path, path)
    return path, source
