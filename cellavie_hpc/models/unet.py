"""U-Net for cell segmentation into {background, interior, boundary}; also home of the conv blocks all models share.

The boundary class is what separates touching red cells into instances, so it gets its own class rather than
being left to post-processing of a binary mask.
"""
from __future__ import annotations

import dataclasses

import keras
from keras import layers

CLASSES = ("background", "interior", "boundary")
NUM_CLASSES = len(CLASSES)
#: BatchNorm moving-average momentum. Keras' default 0.99 leaves 0.99**60 = 55 % of the initial statistics
#: (mean 0, variance 1) after a 60-step run, so a short run evaluates (training=False) on statistics that match
#: no real activation: the tiny classifier then called every held-out cell infected. 0.9 (PyTorch's default)
#: forgets the start within ~50 steps and still averages over ten batches.
BN_MOMENTUM = 0.9


def conv_bn_relu(x, filters: int, name: str, kernel: int = 3, strides: int = 1, dilation: int = 1):
    """Conv (no bias: BatchNorm has one) -> BatchNorm -> ReLU."""
    x = layers.Conv2D(filters, kernel, strides=strides, dilation_rate=dilation, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def residual_block(x, filters: int, name: str, dilation: int = 1):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut; dilation widens the receptive field."""
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_proj")(x)
    y = conv_bn_relu(x, filters, f"{name}_a", dilation=dilation)
    y = layers.Conv2D(filters, 3, padding="same", dilation_rate=dilation, use_bias=False, name=f"{name}_b_conv")(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_b_bn")(y)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))


def float32_output(x, name: str):
    """Output in float32 whatever the compute policy: losses and decoding stay exact under mixed precision."""
    return layers.Activation("linear", dtype="float32", name=name)(x)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """depth: number of 2x downsamplings (patch must be a multiple of 2**depth); width: filters at full size;
    boundary_weight: cross-entropy weight of the thin, rare boundary class."""
    depth: int = 4
    width: int = 32
    boundary_weight: float = 3.0


PRESETS = {"tiny": UNetConfig(depth=2, width=8), "base": UNetConfig(depth=4, width=32)}


def min_patch_multiple(config: UNetConfig) -> int:
    return 2 ** config.depth


def build(config: UNetConfig, patch: int, in_channels: int) -> keras.Model:
    """(P, P, in_channels) -> {"logits": (P, P, 3)}; widths double at each level."""
    inputs = keras.Input((patch, patch, in_channels), name="image")
    x = inputs
    skips = []
    for level in range(config.depth):
        filters = config.width * 2 ** level
        x = conv_bn_relu(x, filters, f"enc{level}_1")
        x = conv_bn_relu(x, filters, f"enc{level}_2")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    bottom = config.width * 2 ** config.depth
    x = conv_bn_relu(x, bottom, "mid_1")
    x = conv_bn_relu(x, bottom, "mid_2")
    for level in reversed(range(config.depth)):
        filters = config.width * 2 ** level
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_cat")([x, skips[level]])
        x = conv_bn_relu(x, filters, f"dec{level}_1")
        x = conv_bn_relu(x, filters, f"dec{level}_2")
    logits = layers.Conv2D(NUM_CLASSES, 1, name="logits_conv")(x)
    return keras.Model(inputs, {"logits": float32_output(logits, "logits")}, name="unet")
