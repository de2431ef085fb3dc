"""A small U-Net: per-pixel class scores (a segmenter's or a text detector's dense output), with the skip
concatenations and bilinear upsampling that make channel pruning couple layers across the network."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgesmith.models.registry import register
from edgesmith.models.spec import channel_stats, image_input

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    def __init__(self, num_classes: int, width: int, in_chans: int, image_size: int):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size {image_size} must be a multiple of 4 (two 2× poolings)")
        self.down1 = _double_conv(in_chans, width)
        self.down2 = _double_conv(width, 2 * width)
        self.bottom = _double_conv(2 * width, 4 * width)
        self.up2 = _double_conv(4 * width + 2 * width, 2 * width)
        self.up1 = _double_conv(2 * width + width, width)
        self.head = nn.Conv2d(width, num_classes, 1)
        self.input_spec = image_input(in_chans, image_size, *channel_stats(in_chans, MNIST_MEAN, MNIST_STD))

    def forward(self, x):
        skip1 = self.down1(x)
        skip2 = self.down2(F.max_pool2d(skip1, 2))
        x = self.bottom(F.max_pool2d(skip2, 2))
        x = self.up2(torch.cat([F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False), skip2], 1))
        x = self.up1(torch.cat([F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False), skip1], 1))
        return self.head(x)   # (batch, classes, H, W) scores


@register()
def unet(num_classes: int = 2, width: int = 16, in_chans: int = 1, image_size: int = 28) -> nn.Module:
    """Small U-Net segmenter (skip concatenations, bilinear upsampling): per-pixel class scores, ~120k params."""
    return UNet(num_classes, width, in_chans, image_size)
