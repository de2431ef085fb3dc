"""A small VGG-style CNN for 1×28×28 digits: the default recipe's model."""
from __future__ import annotations

import torch.nn as nn

from edgesmith.models.registry import register
from edgesmith.models.spec import channel_stats, image_input

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MnistCNN(nn.Module):
    def __init__(self, num_classes: int, width: int, in_chans: int, image_size: int, dropout: float):
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_chans, width), _conv_bn_relu(width, width), nn.MaxPool2d(2),
            _conv_bn_relu(width, 2 * width), _conv_bn_relu(2 * width, 2 * width), nn.MaxPool2d(2),
            _conv_bn_relu(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * width, num_classes))
        self.input_spec = image_input(in_chans, image_size, *channel_stats(in_chans, MNIST_MEAN, MNIST_STD))

    def forward(self, x):
        return self.classifier(self.features(x))


@register()
def mnist_cnn(num_classes: int = 10, width: int = 24, in_chans: int = 1, image_size: int = 28,
              dropout: float = 0.2) -> nn.Module:
    """Small CNN for 1×28×28 digits (five conv-BN-ReLU blocks, ~80k params)."""
    return MnistCNN(num_classes, width, in_chans, image_size, dropout)
