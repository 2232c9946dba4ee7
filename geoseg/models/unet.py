"""UNet (Ronneberger et al., 2015) in ``paddle.nn``, with a width multiplier.

Four 2×2 max-pool downsampling levels and four upsampling levels (``depth`` 1–4 keeps the
first levels only: a smaller receptive field and fewer weights); every level is a double
convolution (3×3 conv-bn-relu twice).  Channels are 64, 128, 256, 512, 1024 at
``width=1.0`` (about 31 M parameters) and scale with ``width`` (0.25 → 16 … 256, about
2 M).  Upsampling is bilinear (default, cheaper) or a 2×2 transposed convolution; the
upsampled tensor is brought to the exact size of its skip connection, so any input height
and width work, odd ones included.  All tensors are NCHW float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import paddle
import paddle.nn.functional as F
from paddle import nn

from geoseg.errors import ModelError
from geoseg.models import (
    check_indices, expand_input, network_in_channels, register_model, validate_io,
)

__all__ = ["UNet"]

logger = logging.getLogger(__name__)

_BASE_CHANNELS = (64, 128, 256, 512, 1024)

UpsampleMode = Literal["bilinear", "transpose"]


def _resize_to(x: paddle.Tensor, like: paddle.Tensor) -> paddle.Tensor:
    # paddle.shape keeps the size dynamic in exported static graphs.
    return F.interpolate(x, size=paddle.shape(like)[2:], mode="bilinear", align_corners=False)


class DoubleConv(nn.Sequential):
    """(3×3 conv → BN → ReLU) × 2, NCHW, size preserving."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        """Create the block.

        Args:
            in_channels: Input channels.
            out_channels: Output channels of both convolutions.
        """
        super().__init__(
            nn.Conv2D(in_channels, out_channels, 3, padding=1, bias_attr=False),
            nn.BatchNorm2D(out_channels),
            nn.ReLU(),
            nn.Conv2D(out_channels, out_channels, 3, padding=1, bias_attr=False),
            nn.BatchNorm2D(out_channels),
            nn.ReLU(),
        )


class Up(nn.Layer):
    """Upsample ×2 to the skip's size, concatenate with the skip, double conv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, mode: UpsampleMode) -> None:
        """Create the block.

        Args:
            in_channels: Channels of the deeper (coarser) input.
            skip_channels: Channels of the skip connection.
            out_channels: Output channels.
            mode: ``"bilinear"`` (no parameters) or ``"transpose"`` (2×2 transposed conv
                halving the channels).
        """
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            self.up: nn.Layer | None = nn.Conv2DTranspose(in_channels, in_channels // 2, 2, stride=2)
            in_channels //= 2
        else:
            self.up = None
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: paddle.Tensor, skip: paddle.Tensor) -> paddle.Tensor:
        """Map ``[N, C_in, h, w]`` and skip ``[N, C_skip, H, W]`` to ``[N, C_out, H, W]``."""
        if self.up is not None:
            x = self.up(x)
        # Always resize to the skip: odd sizes make 2*floor(H/2) != H, and a Python size
        # test would be frozen into exported graphs.  Same-size bilinear is an exact copy.
        x = _resize_to(x, skip)
        return self.conv(paddle.concat([skip, x], axis=1))


@register_model("unet")
class UNet(nn.Layer):
    """UNet segmentation network.

    ``forward`` maps a float32 NCHW batch ``[N, in_channels, H, W]`` to ``[logits]``
    with logits ``[N, num_classes, H, W]`` (same H, W as the input).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        width: float = 1.0,
        upsample: UpsampleMode = "bilinear",
        depth: int = 4,
        gap_channels: bool = False,
        indices: Sequence[Sequence[int]] | None = None,
        band_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        pretrained: str | Path | None = None,
    ) -> None:
        """Create the network.

        Args:
            num_classes: Output channels of the logits.
            in_channels: Input bands (any number >= 1).
            width: Multiplier on the level channels 64…1024 (rounded, at least 1);
                0.25 gives 16…256.
            upsample: ``"bilinear"`` or ``"transpose"`` (learned 2×2 transposed conv).
            depth: Downsampling levels, 1–4 (4 = the paper's network; fewer levels see
                less context around each pixel).
            gap_channels: Read NaN input values as "no data in this band" and add one
                presence channel per band (see :func:`geoseg.models.gap_channels_input`).
            indices: Pairs ``[a, b]`` of 1-based band positions; each adds the input channel
                ``(A - B) / (|A| + |B|)`` of the bands before normalisation (e.g. ``[[4, 3]]``
                = NDVI for blue, green, red, NIR; see
                :func:`geoseg.models.normalized_difference_input`).
            band_stats: The normalisation ``(mean, std)`` of the input bands; needed with
                ``indices`` (the model card passes it).
            pretrained: Optional ``.pdparams`` file with weights for the whole network,
                loaded with :func:`geoseg.models.checkpoints.load_weights`.

        Raises:
            ModelError: An argument is out of range.
            WeightsError: ``pretrained`` cannot be loaded into this network.
        """
        super().__init__()
        validate_io(num_classes, in_channels)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
            raise ModelError(f"width must be a number in (0, 4], got {width!r}")
        if isinstance(depth, bool) or depth not in (1, 2, 3, 4):
            raise ModelError(f"depth must be 1, 2, 3 or 4, got {depth!r}")
        if upsample not in ("bilinear", "transpose"):
            raise ModelError(f"upsample must be 'bilinear' or 'transpose', got {upsample!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.indices = check_indices(indices, in_channels, band_stats)
        net_in = network_in_channels(in_channels, gap_channels, self.indices)
        self.gap_channels = gap_channels
        self.band_stats = band_stats
        ch = [max(1, round(c * width)) for c in _BASE_CHANNELS[: depth + 1]]
        self.channels = tuple(ch)
        self.inc = DoubleConv(net_in, ch[0])
        # ceil_mode: odd sizes round up, so tiny inputs never pool down to zero pixels.
        self.pool = nn.MaxPool2D(kernel_size=2, stride=2, ceil_mode=True)
        self.downs = nn.LayerList([DoubleConv(ch[i], ch[i + 1]) for i in range(depth)])
        self.ups = nn.LayerList([Up(ch[i + 1], ch[i], ch[i], upsample) for i in reversed(range(depth))])
        self.classifier = nn.Conv2D(ch[0], num_classes, 1)
        if pretrained is not None:
            from geoseg.models.checkpoints import load_weights

            load_weights(self, pretrained)

    def forward(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        """Map ``[N, in_channels, H, W]`` float32 to ``[logits]``, logits ``[N, num_classes, H, W]``."""
        x = expand_input(x, self.gap_channels, self.indices, self.band_stats)
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return [self.classifier(y)]
