"""GoogLeNet as in Table 1 and section 5 of Szegedy et al., "Going deeper with convolutions".

The network is the paper's, not torchvision's variant: no batch normalisation, local
response normalisation in the stem (Caffe's bvlc_googlenet settings), real 5×5
convolutions in the Inception modules, ReLU after every convolution, max pools with
``ceil_mode=True`` (224 → 112 → 56 → 28 → 14 → 7), global average pooling, dropout 0.4 and
one linear classifier. Two auxiliary classifiers sit on the outputs of 4a and 4d during
training; their losses are added with weight 0.3 (:func:`training_loss`).

Any input of at least 32×32 works: the main head pools adaptively to 1×1, and the
auxiliary heads fall back to adaptive pooling to 4×4 when the feature map is not the
paper's 14×14 (see :class:`InceptionAux`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AUX_LOSS_WEIGHT",
    "BasicConv2d",
    "GoogLeNet",
    "GoogLeNetOutputs",
    "Inception",
    "InceptionAux",
    "googlenet",
    "main_logits",
    "training_loss",
]

AUX_LOSS_WEIGHT = 0.3  # section 5: "the losses of the auxiliary classifiers were weighted by 0.3"


class GoogLeNetOutputs(NamedTuple):
    """What :class:`GoogLeNet` returns in training mode with auxiliary classifiers."""

    logits: Tensor
    aux1: Tensor
    aux2: Tensor


class BasicConv2d(nn.Module):
    """Convolution with bias followed by ReLU (no batch norm, as in the paper)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(x))


class Inception(nn.Module):
    """Inception module: 1×1, 1×1→3×3, 1×1→5×5 and 3×3 max pool→1×1 branches, concatenated.

    Arguments follow Table 1's columns: ``#1×1, #3×3 reduce, #3×3, #5×5 reduce, #5×5,
    pool proj``. The output has ``ch1x1 + ch3x3 + ch5x5 + pool_proj`` channels and the
    input's spatial size.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, 1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, 1), BasicConv2d(ch3x3red, ch3x3, 3)
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, 1), BasicConv2d(ch5x5red, ch5x5, 5)
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, 1),
        )
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)]
        return torch.cat(branches, dim=1)


class InceptionAux(nn.Module):
    """Auxiliary classifier of section 5, on the output of 4a or 4d.

    Average pool 5×5/3 (14×14 → 4×4), 1×1 conv 128 + ReLU, fc 2048 → 1024 + ReLU,
    dropout, fc 1024 → ``num_classes``. The fc layer needs a 4×4 map: when the input
    map is smaller than 14×14 (images below 224 px) the 5×5/3 pool is replaced by
    adaptive average pooling to 4×4, and when it is larger and the 5×5/3 pool does
    not give 4×4, adaptive pooling to 4×4 follows it.
    """

    POOL_INPUT = 14  # the paper's 4a/4d map at 224×224; 5×5/3 pooling gives exactly 4×4

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7) -> None:
        super().__init__()
        self.conv = BasicConv2d(in_channels, 128, 1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: Tensor) -> Tensor:
        if min(x.shape[-2:]) >= self.POOL_INPUT:
            x = F.avg_pool2d(x, kernel_size=5, stride=3)
        if tuple(x.shape[-2:]) != (4, 4):
            x = F.adaptive_avg_pool2d(x, (4, 4))
        x = self.conv(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x), inplace=True)
        x = self.dropout(x)
        return self.fc2(x)


class GoogLeNet(nn.Module):
    """The GoogLeNet of Table 1 (no batch norm), for NCHW images of at least 32×32.

    ``forward`` returns :class:`GoogLeNetOutputs` when ``self.training and
    self.aux_logits``, otherwise the main logits ``(N, num_classes)``. With
    ``aux_logits=False`` the auxiliary heads are not built (``aux1``/``aux2`` are None).

    Initialisation (deterministic under ``torch.manual_seed``): Kaiming-normal with
    ``mode="fan_in"`` (ReLU gain) for convolutions, normal(0, 0.01) for linear layers,
    zero biases. Without batch norm nothing rescales activations, so the init must keep
    the forward signal steady: fan_in does (activation RMS stays about 1-5 from conv1 to
    5b at 224×224). fan_out does not, because the 1×1 reduce layers have fan_out much
    smaller than fan_in (832 → 32 in 5a): activations grow to RMS ~150 at 5b, the
    initial loss is ~30, and SGD (lr 0.01, momentum 0.9) reached NaN within 25 steps.
    Xavier trains but stalls near chance for ~150 steps. With fan_in the loss on a
    10-class 32×32 synthetic task fell from 3.8 to 0.08 in 200 steps (batch 32).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        aux_logits: bool = True,
        dropout: float = 0.4,
        aux_dropout: float = 0.7,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        for name, p in (("dropout", dropout), ("aux_dropout", aux_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")
        self.aux_logits = aux_logits

        # Stem (Table 1 and Figure 3).
        self.conv1 = BasicConv2d(3, 64, 7, stride=2)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.lrn1 = nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)
        self.conv2 = BasicConv2d(64, 64, 1)
        self.conv3 = BasicConv2d(64, 192, 3)
        self.lrn2 = nn.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=1.0)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        # Inception stages; arguments are Table 1's six filter-count columns.
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)

        # Head.
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

        self.aux1: InceptionAux | None = None
        self.aux2: InceptionAux | None = None
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, dropout=aux_dropout)
            self.aux2 = InceptionAux(528, num_classes, dropout=aux_dropout)

        self._init_weights()

    def _init_weights(self) -> None:
        # fan_in, not fan_out: see the class docstring (no batch norm to absorb the scale).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> GoogLeNetOutputs | Tensor:
        x = self.maxpool1(self.conv1(x))
        x = self.lrn1(x)
        x = self.conv3(self.conv2(x))
        x = self.maxpool2(self.lrn2(x))

        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        with_aux = self.training and self.aux_logits
        aux1 = self.aux1(x) if with_aux and self.aux1 is not None else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if with_aux and self.aux2 is not None else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))

        x = torch.flatten(self.avgpool(x), 1)
        logits = self.fc(self.dropout(x))
        if aux1 is not None and aux2 is not None:
            return GoogLeNetOutputs(logits, aux1, aux2)
        return logits


def googlenet(num_classes: int = 1000, aux_logits: bool = True, **kwargs: float) -> GoogLeNet:
    """Build the paper's GoogLeNet; ``kwargs`` go to :class:`GoogLeNet` (dropout rates)."""
    return GoogLeNet(num_classes=num_classes, aux_logits=aux_logits, **kwargs)


def main_logits(outputs: GoogLeNetOutputs | Tensor) -> Tensor:
    """The main classifier's logits, from either kind of model output."""
    return outputs.logits if isinstance(outputs, GoogLeNetOutputs) else outputs


def training_loss(outputs: GoogLeNetOutputs | Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the main head plus 0.3 × (aux1 + aux2) when aux outputs are present."""
    if isinstance(outputs, GoogLeNetOutputs):
        main = F.cross_entropy(outputs.logits, targets)
        aux = F.cross_entropy(outputs.aux1, targets) + F.cross_entropy(outputs.aux2, targets)
        return main + AUX_LOSS_WEIGHT * aux
    return F.cross_entropy(outputs, targets)
