"""DeepLabv3+ with a ResNet-vd backbone, in ``paddle.nn``.

Architecture (Chen et al., 2018, "Encoder-Decoder with Atrous Separable Convolution"):

* **Backbone** :class:`ResNetVd` — ResNet with the "vd" tweaks (He et al., 2019, "Bag of
  Tricks"): a deep stem of three 3×3 convolutions instead of one 7×7, and downsampling
  shortcuts that average-pool 2×2 before their 1×1 convolution instead of using a strided
  1×1.  Depth 18/34 (basic blocks) or 50/101 (bottlenecks); ``width`` scales every
  backbone channel count for compact variants.  The last stage (output stride 16) or the
  last two stages (output stride 8) are dilated instead of strided.
* **ASPP** — a 1×1 branch, three atrous 3×3 branches (rates 6/12/18 at OS16, 12/24/36 at
  OS8) and an image-pooling branch (global average pool → 1×1 → upsample), concatenated
  and projected by a 1×1 convolution.
* **Decoder** — the stride-4 low-level features projected to 48 channels are concatenated
  with the ASPP output upsampled to their size, fused by two 3×3 conv-bn-relu, classified
  by a 1×1 convolution, and the logits are resized (bilinear, ``align_corners=False``) to
  the input size.

With ``fine_channels > 0`` an optional full-resolution refinement follows the decoder (not in
the paper; for coarse imagery such as 30 m Landsat, where fields, ponds and streams are a few
pixels wide and stride-4 logits blur them away): two 3×3 conv-bn-relu on the input give
``fine_channels`` full-resolution features, the decoder output projected (1×1) to
``2 * fine_channels`` is resized to the input size and fused with them by one 3×3 convolution
before the classifier.  ``fine_channels=0`` (default) is the paper's network.

With ``separable=True`` the 3×3 convolutions of the ASPP and decoder are depthwise-separable
(as in the paper), which shrinks the head several-fold.

All tensors are NCHW float32.  Any band count and any input height/width work (sizes need
not be multiples of 16): strided layers round up, and every resize targets the exact size
of the tensor it is fused with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import paddle
import paddle.nn.functional as F
from paddle import nn

from geoseg.errors import ModelError
from geoseg.models import (
    DEEPLAB_ASPP_RATES, check_indices, expand_input, network_in_channels,
    register_model, validate_io,
)

__all__ = ["ASPP", "DeepLabV3P", "ResNetVd"]

logger = logging.getLogger(__name__)

#: Blocks per stage for each supported depth, and whether the blocks are bottlenecks.
_RESNET_CONFIGS: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}

#: ASPP atrous rates and (stride, dilation) of stages 3 and 4 for each output stride.
_OS_CONFIGS: dict[int, tuple[tuple[int, int, int], tuple[tuple[int, int], tuple[int, int]]]] = {
    16: (DEEPLAB_ASPP_RATES[16], ((2, 1), (1, 2))),
    8: (DEEPLAB_ASPP_RATES[8], ((1, 2), (1, 4))),
}


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width``, rounded to a multiple of ``divisor`` (at least one).

    Multiples of 8 keep oneDNN / cuDNN kernels on their vectorised paths.

    Args:
        channels: Channel count at width 1.0.
        width: Multiplier (> 0).
        divisor: Rounding step.

    Returns:
        The scaled channel count.
    """
    return max(divisor, int(channels * width / divisor + 0.5) * divisor)


def _check_width(name: str, width: float) -> float:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
        raise ModelError(f"{name} must be a number in (0, 4], got {width!r}")
    return float(width)


def resize_to(x: paddle.Tensor, like: paddle.Tensor) -> paddle.Tensor:
    """Bilinearly resize NCHW ``x`` to the height and width of NCHW ``like``.

    The target size is read with ``paddle.shape`` so that exported static graphs keep it
    dynamic (``Tensor.shape`` would freeze or lose it).

    Args:
        x: Tensor ``[N, C, h, w]``.
        like: Tensor ``[N, *, H, W]`` whose spatial size is the target.

    Returns:
        Tensor ``[N, C, H, W]`` (``align_corners=False``).
    """
    return F.interpolate(x, size=paddle.shape(like)[2:], mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """Convolution (no bias) → batch norm → optional ReLU, NCHW, "same" padding."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        act: bool = True,
        groups: int = 1,
    ) -> None:
        """Create the block.

        Args:
            in_channels: Input channels.
            out_channels: Output channels.
            kernel_size: Square kernel size (odd).
            stride: Convolution stride; output size is ``ceil(input / stride)``.
            dilation: Convolution dilation.
            act: Append a ReLU.
            groups: Convolution groups (``in_channels`` for a depthwise convolution).
        """
        padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Layer] = [
            nn.Conv2D(
                in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                dilation=dilation, groups=groups, bias_attr=False,
            ),
            nn.BatchNorm2D(out_channels),
        ]
        if act:
            layers.append(nn.ReLU())
        super().__init__(*layers)


def conv3x3(in_channels: int, out_channels: int, dilation: int = 1, separable: bool = False) -> nn.Layer:
    """3×3 conv-bn-relu, or its depthwise-separable form (3×3 depthwise-bn → 1×1 conv-bn-relu).

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        dilation: Dilation of the 3×3 (depthwise) convolution.
        separable: Use the depthwise-separable form (about 9× fewer weights).

    Returns:
        A size-preserving NCHW layer.
    """
    if not separable:
        return ConvBNReLU(in_channels, out_channels, 3, dilation=dilation)
    return nn.Sequential(
        ConvBNReLU(in_channels, in_channels, 3, dilation=dilation, act=False, groups=in_channels),
        ConvBNReLU(in_channels, out_channels, 1),
    )


class _Shortcut(nn.Sequential):
    """ResNet-vd projection shortcut: [2×2 avg-pool (ceil) if strided] → 1×1 conv → BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        layers: list[nn.Layer] = []
        if stride != 1:
            # ceil_mode matches the ceil(H/2) size of the strided 3x3 on odd inputs.
            layers.append(nn.AvgPool2D(kernel_size=2, stride=2, ceil_mode=True, exclusive=True))
        layers.append(ConvBNReLU(in_channels, out_channels, 1, act=False))
        super().__init__(*layers)


class BasicBlock(nn.Layer):
    """Two 3×3 conv-bn layers with an identity or vd shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1) -> None:
        """Create the block.

        Args:
            in_channels: Input channels.
            channels: Output channels (``channels * expansion``).
            stride: 1 or 2 (applied by the first 3×3 convolution).
            dilation: Dilation of both 3×3 convolutions.
        """
        super().__init__()
        out = channels * self.expansion
        self.conv1 = ConvBNReLU(in_channels, channels, 3, stride=stride, dilation=dilation)
        self.conv2 = ConvBNReLU(channels, out, 3, dilation=dilation, act=False)
        self.shortcut = _Shortcut(in_channels, out, stride) if stride != 1 or in_channels != out else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Map ``[N, C_in, H, W]`` to ``[N, C_out, ceil(H/s), ceil(W/s)]``."""
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class BottleneckBlock(nn.Layer):
    """1×1 reduce → 3×3 (strided/dilated) → 1×1 expand, with a vd shortcut (ResNet-50/101)."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, dilation: int = 1) -> None:
        """Create the block.

        Args:
            in_channels: Input channels.
            channels: Bottleneck channels; output has ``channels * 4``.
            stride: 1 or 2 (applied by the 3×3 convolution).
            dilation: Dilation of the 3×3 convolution.
        """
        super().__init__()
        out = channels * self.expansion
        self.conv1 = ConvBNReLU(in_channels, channels, 1)
        self.conv2 = ConvBNReLU(channels, channels, 3, stride=stride, dilation=dilation)
        self.conv3 = ConvBNReLU(channels, out, 1, act=False)
        self.shortcut = _Shortcut(in_channels, out, stride) if stride != 1 or in_channels != out else None

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Map ``[N, C_in, H, W]`` to ``[N, 4*channels, ceil(H/s), ceil(W/s)]``."""
        identity = x if self.shortcut is None else self.shortcut(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNetVd(nn.Layer):
    """ResNet-vd feature extractor returning the four stage outputs (NCHW).

    Stage outputs have strides 4, 8, 16 and 32 for ``output_stride=32``; with 16 the last
    stage is dilated (stride 16), with 8 the last two (stride 8).

    Attributes:
        feat_channels: Channels of the four stage outputs.
    """

    def __init__(
        self,
        in_channels: int = 3,
        depth: int = 18,
        width: float = 1.0,
        output_stride: int = 16,
    ) -> None:
        """Create the backbone.

        Args:
            in_channels: Input bands ``C`` of the ``[N, C, H, W]`` input.
            depth: 18, 34, 50 or 101.
            width: Multiplier on every channel count (1.0 = standard ResNet).
            output_stride: 8, 16 or 32: total stride of the last stage.

        Raises:
            ModelError: An argument is out of range.
        """
        super().__init__()
        if depth not in _RESNET_CONFIGS:
            raise ModelError(f"backbone_depth must be one of {sorted(_RESNET_CONFIGS)}, got {depth!r}")
        if output_stride not in (8, 16, 32):
            raise ModelError(f"output_stride must be 8 or 16, got {output_stride!r}")
        width = _check_width("backbone_width", width)
        blocks, bottleneck = _RESNET_CONFIGS[depth]
        block: type[BasicBlock] | type[BottleneckBlock] = BottleneckBlock if bottleneck else BasicBlock
        if output_stride == 32:
            strides_dilations = ((1, 1), (2, 1), (2, 1), (2, 1))
        else:
            s3, s4 = _OS_CONFIGS[output_stride][1]
            strides_dilations = ((1, 1), (2, 1), s3, s4)

        stem = scale_channels(32, width)
        self.stem = nn.Sequential(
            ConvBNReLU(in_channels, stem, 3, stride=2),
            ConvBNReLU(stem, stem, 3),
            ConvBNReLU(stem, scale_channels(64, width), 3),
            nn.MaxPool2D(kernel_size=3, stride=2, padding=1),
        )
        channels = scale_channels(64, width)
        self.stages = nn.LayerList()
        self.feat_channels: list[int] = []
        for i, (n, (stride, dilation)) in enumerate(zip(blocks, strides_dilations)):
            mid = scale_channels(64 * 2**i, width)
            layers = []
            for j in range(n):
                layers.append(block(channels, mid, stride=stride if j == 0 else 1, dilation=dilation))
                channels = mid * block.expansion
            self.stages.append(nn.Sequential(*layers))
            self.feat_channels.append(channels)

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        """Map ``[N, C, H, W]`` to the four stage outputs ``[N, feat_channels[i], H/s_i, W/s_i]``."""
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


class ASPP(nn.Layer):
    """Atrous spatial pyramid pooling with an image-pooling branch (NCHW)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int],
        dropout: float = 0.1,
        separable: bool = False,
        image_pooling: bool = True,
    ) -> None:
        """Create the module.

        Args:
            in_channels: Channels of the backbone's last stage.
            out_channels: Channels of every branch and of the projected output.
            rates: Dilations of the three atrous 3×3 branches.
            dropout: Dropout after the projection (training only).
            separable: Make the atrous branches depthwise-separable.
            image_pooling: Keep the image-pooling branch (global average of the window).
        """
        super().__init__()
        self.branches = nn.LayerList(
            [ConvBNReLU(in_channels, out_channels, 1)]
            + [conv3x3(in_channels, out_channels, dilation=r, separable=separable) for r in rates]
        )
        self.image_pooling = image_pooling
        if image_pooling:
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.pool_conv = ConvBNReLU(in_channels, out_channels, 1)
        self.project = ConvBNReLU(out_channels * (len(rates) + 1 + int(image_pooling)), out_channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        """Map ``[N, in_channels, h, w]`` to ``[N, out_channels, h, w]``."""
        outs = [branch(x) for branch in self.branches]
        if self.image_pooling:
            outs.append(resize_to(self.pool_conv(self.pool(x)), x))
        return self.dropout(self.project(paddle.concat(outs, axis=1)))


@register_model("deeplabv3p")
class DeepLabV3P(nn.Layer):
    """DeepLabv3+ segmentation network with a ResNet-vd backbone.

    ``forward`` maps a float32 NCHW batch ``[N, in_channels, H, W]`` to
    ``[logits]`` with logits ``[N, num_classes, H, W]`` (same H, W as the input).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone_depth: int = 18,
        output_stride: int = 16,
        backbone_width: float = 1.0,
        aspp_channels: int = 256,
        decoder_channels: int = 256,
        separable: bool = False,
        fine_channels: int = 0,
        image_pooling: bool = True,
        aspp_rates: Sequence[int] | None = None,
        gap_channels: bool = False,
        indices: Sequence[Sequence[int]] | None = None,
        band_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        pretrained: str | Path | None = None,
        backbone: ResNetVd | None = None,
    ) -> None:
        """Create the network.

        Args:
            num_classes: Output channels of the logits.
            in_channels: Input bands (any number >= 1).
            backbone_depth: ResNet-vd depth: 18, 34, 50 or 101.
            output_stride: 16 (ASPP rates 6/12/18) or 8 (12/24/36; slower, finer).
            backbone_width: Multiplier on backbone channels (e.g. 0.5 for a compact model).
            aspp_channels: Channels of the ASPP branches and output.
            decoder_channels: Channels of the decoder's two 3×3 convolutions.
            separable: Use depthwise-separable 3×3 convolutions in the ASPP and decoder,
                as in the DeepLabv3+ paper (much smaller head: R18 at ``backbone_width=0.5``
                with 128 ASPP/decoder channels is ~12 MB of fp32 weights instead of ~17).
            fine_channels: Channels of the optional full-resolution refinement after the
                decoder (0 = none, the paper's network; e.g. 16 for 30 m imagery).
            image_pooling: Keep the ASPP's image-pooling branch (the paper's network). Its
                global average depends on the window size, so a model trained on small
                windows can go wrong on much larger ones; without it the network is fully
                convolutional and predicts the same at any window size.
            aspp_rates: Dilations of the three atrous ASPP branches (default: the paper's,
                6/12/18 at output stride 16 and 12/24/36 at 8). Small windows need small
                rates: at output stride 8, rate 12 already reaches 96 input pixels.
            gap_channels: Read NaN input values as "no data in this band" and add one
                presence channel per band (see :func:`geoseg.models.gap_channels_input`);
                the backbone and the refinement then take ``2 * in_channels`` channels.
            indices: Normalised-difference input channels of band pairs, and
            band_stats: the normalisation ``(mean, std)`` they undo, as for the UNet (see
                :func:`geoseg.models.check_indices`).
            pretrained: Optional ``.pdparams`` file with weights for the whole network,
                loaded with :func:`geoseg.models.checkpoints.load_weights`.
            backbone: A ready-made :class:`ResNetVd` to use instead of building one from
                ``in_channels``/``backbone_depth``/``backbone_width``/``output_stride``
                (its ``output_stride`` must still be 8 or 16 and given here too).

        Raises:
            ModelError: An argument is out of range.
            WeightsError: ``pretrained`` cannot be loaded into this network.
        """
        super().__init__()
        validate_io(num_classes, in_channels)
        if output_stride not in _OS_CONFIGS:
            raise ModelError(f"output_stride must be 8 or 16, got {output_stride!r}")
        for label, value in (("aspp_channels", aspp_channels), ("decoder_channels", decoder_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"{label} must be a positive integer, got {value!r}")
        if isinstance(fine_channels, bool) or not isinstance(fine_channels, int) or fine_channels < 0:
            raise ModelError(f"fine_channels must be 0 (off) or a positive integer, got {fine_channels!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.indices = check_indices(indices, in_channels, band_stats)
        net_in = network_in_channels(in_channels, gap_channels, self.indices)
        self.gap_channels = gap_channels
        self.band_stats = band_stats
        self.backbone = backbone or ResNetVd(net_in, backbone_depth, backbone_width, output_stride)
        low_channels, high_channels = self.backbone.feat_channels[0], self.backbone.feat_channels[-1]
        if not isinstance(image_pooling, bool):
            raise ModelError(f"image_pooling must be true or false, got {image_pooling!r}")
        if aspp_rates is None:
            rates = _OS_CONFIGS[output_stride][0]
        elif (isinstance(aspp_rates, (list, tuple)) and len(aspp_rates) == 3
              and all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in aspp_rates)):
            rates = tuple(aspp_rates)
        else:
            raise ModelError(f"aspp_rates must be three positive integers (e.g. [2, 4, 6]), got {aspp_rates!r}")
        self.aspp = ASPP(high_channels, aspp_channels, rates, separable=separable, image_pooling=image_pooling)
        self.low_project = ConvBNReLU(low_channels, 48, 1)
        self.decoder = nn.Sequential(
            conv3x3(aspp_channels + 48, decoder_channels, separable=separable),
            conv3x3(decoder_channels, decoder_channels, separable=separable),
        )
        self.fine_channels = fine_channels
        if fine_channels:
            f = fine_channels
            self.fine = nn.Sequential(ConvBNReLU(net_in, f, 3), ConvBNReLU(f, f, 3))
            self.fine_project = ConvBNReLU(decoder_channels, 2 * f, 1)
            self.fine_fuse = conv3x3(3 * f, 2 * f, separable=separable)
            self.classifier = nn.Conv2D(2 * f, num_classes, 1)
        else:
            self.classifier = nn.Conv2D(decoder_channels, num_classes, 1)
        if pretrained is not None:
            from geoseg.models.checkpoints import load_weights

            load_weights(self, pretrained)

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        """Map ``[N, in_channels, H, W]`` float32 to ``[logits]``, logits ``[N, num_classes, H, W]``."""
        x = expand_input(x, self.gap_channels, self.indices, self.band_stats)
        feats = self.backbone(x)
        low = self.low_project(feats[0])
        high = resize_to(self.aspp(feats[-1]), low)
        y = self.decoder(paddle.concat([high, low], axis=1))
        if self.fine_channels:
            y = resize_to(self.fine_project(y), x)
            return [self.classifier(self.fine_fuse(paddle.concat([y, self.fine(x)], axis=1)))]
        return [resize_to(self.classifier(y), x)]
