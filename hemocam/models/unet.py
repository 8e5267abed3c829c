"""2D U-Net for slice segmentation, with neighbouring slices stacked as extra input channels.

The input of one sample is the slice plus ``context`` slices on each side, each with the C
windowed channels of the cache, so ``in_channels = C * (2 * context + 1)``: a 2.5D view that gives
the network some through-plane evidence at 2D cost.

Encoders: ``resnet18`` / ``resnet34`` (torchvision, random init or a local weights file; the stem
is rebuilt for ``in_channels``) or ``plain`` (a small VGG-style encoder, the lightest option for
CPUs). The decoder is the usual upsample + skip concatenation + two 3x3 convs per level.
Output: one logit map at the input resolution. :class:`UNetEnsemble`: members trained alike from
different seeds, their mean probability as one logit map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ENCODERS = ("resnet18", "resnet34", "plain")


def _conv_block(cin, cout):
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _ResNetEncoder(nn.Module):
    def __init__(self, arch: str, in_channels: int, weights: str = ""):
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if weights:
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        if in_channels != 3:
            old = net.conv1
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
            if weights:  # keep pretrained filters: average RGB, repeat over the stacked channels
                with torch.no_grad():
                    net.conv1.weight.copy_(old.weight.mean(1, keepdim=True).repeat(1, in_channels, 1, 1) * 3 / in_channels)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu)  # /2, 64
        self.pool = net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = (64, 64, 128, 256, 512)  # at strides 2, 4, 8, 16, 32

    def forward(self, x):
        s1 = self.stem(x)
        s2 = self.layer1(self.pool(s1))
        s3 = self.layer2(s2)
        s4 = self.layer3(s3)
        s5 = self.layer4(s4)
        return [s1, s2, s3, s4, s5]


class _PlainEncoder(nn.Module):
    def __init__(self, in_channels: int, base: int = 16):
        super().__init__()
        chans = [base, base * 2, base * 4, base * 8, base * 16]
        self.blocks = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.blocks.append(_conv_block(cin, c))
            cin = c
        self.channels = tuple(chans)  # at strides 1, 2, 4, 8, 16

    def forward(self, x):
        feats = []
        for i, block in enumerate(self.blocks):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            feats.append(x)
        return feats


class _Up(nn.Module):
    def __init__(self, cin, cskip, cout):
        super().__init__()
        self.conv = _conv_block(cin + cskip, cout)

    def forward(self, x, skip):
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([x, skip], 1))


class UNet(nn.Module):
    """``UNet(in_channels, encoder)``; ``forward(x: (B, in_channels, H, W)) -> logits (B, 1, H, W)``.

    H and W need not be powers of two: the decoder upsamples to each skip's exact size.
    """

    def __init__(self, in_channels: int, encoder: str = "resnet18", base: int = 16, weights: str = ""):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"segmenter encoder {encoder!r} not in {ENCODERS}")
        self.in_channels, self.encoder_name = in_channels, encoder
        if encoder == "plain":
            self.encoder = _PlainEncoder(in_channels, base)
            dec = [base * 8, base * 4, base * 2, base]
        else:
            self.encoder = _ResNetEncoder(encoder, in_channels, weights)
            dec = [256, 128, 64, 32]
        ch = self.encoder.channels
        self.ups = nn.ModuleList()
        cin = ch[4]
        for skip, cout in zip(ch[3::-1], dec):
            self.ups.append(_Up(cin, skip, cout))
            cin = cout
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, x):
        size = x.shape[-2:]
        feats = self.encoder(x)
        y = feats[4]
        for up, skip in zip(self.ups, feats[3::-1]):
            y = up(y, skip)
        y = self.head(y)
        if y.shape[-2:] != size:  # the ResNet stem works at /2: finish with a bilinear upsample
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y


class UNetEnsemble(nn.Module):
    """U-Nets trained alike from different seeds; it predicts their mean probability.

    ``forward`` returns the logit of the members' mean probability, so code that takes a U-Net's
    logits (thresholds, test-time flips) takes an ensemble too.
    """

    def __init__(self, members):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        if len({m.in_channels for m in members}) != 1:
            raise ValueError("the members of a U-Net ensemble must take the same input channels")
        self.members = nn.ModuleList(members)
        self.in_channels = members[0].in_channels

    def forward(self, x):
        p = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(p, eps=1e-7)


def in_channels_for(n_windows: int, context: int) -> int:
    return n_windows * (2 * context + 1)
