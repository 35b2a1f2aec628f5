"""Refocusing CNN: defocused complex field (real/imag per illumination angle) -> in-focus phase in radians.

A residual encoder-decoder: two stride-2 stages shrink the field, dilated residual blocks at 1/4 resolution give the
receptive field that a defocus blur of tens of pixels needs, and additive skips bring the fine detail back.
The optional second head (``defocus_head``, off in the presets: on 10 training images it did not beat predicting 0,
see docs/models.rst) regresses the defocus distance in micrometres from
the pooled bottleneck, which lets the chain check (or replace) the numerical autofocus.
"""
from __future__ import annotations

import dataclasses

import keras
from keras import layers

from cellavie_hpc.models.unet import conv_bn_relu, float32_output, residual_block


@dataclasses.dataclass(frozen=True)
class RefocusConfig:
    """width: filters at full size (x2 per stage); dilations: one residual block per rate at 1/4 resolution;
    defocus_head: also regress the defocus distance (micrometres), weighted by defocus_weight in the loss on the
    scale of defocus_scale_um (so a 10 um error costs like a 1 rad phase error at the defaults)."""
    width: int = 32
    dilations: tuple[int, ...] = (1, 2, 4, 8, 1)
    defocus_head: bool = False
    defocus_weight: float = 0.1
    defocus_scale_um: float = 10.0


PRESETS = {
    "tiny": RefocusConfig(width=8, dilations=(1, 2, 4)),
    "base": RefocusConfig(width=32, dilations=(1, 2, 4, 8, 16, 1)),
}


def min_patch_multiple(config: RefocusConfig) -> int:
    return 4


def build(config: RefocusConfig, patch: int, in_channels: int) -> keras.Model:
    """(P, P, 2A) -> {"phase": (P, P, 1)[, "defocus_um": (1,)]}."""
    inputs = keras.Input((patch, patch, in_channels), name="field")
    w = config.width
    full = conv_bn_relu(inputs, w, "stem")
    half = conv_bn_relu(full, 2 * w, "down1", strides=2)
    half = residual_block(half, 2 * w, "half_res")
    x = conv_bn_relu(half, 4 * w, "down2", strides=2)
    for i, rate in enumerate(config.dilations):
        x = residual_block(x, 4 * w, f"dilated{i}_r{rate}", dilation=rate)
    bottleneck = x
    x = layers.Conv2DTranspose(2 * w, 2, strides=2, name="up1")(x)
    x = layers.Add(name="skip_half")([x, half])
    x = residual_block(x, 2 * w, "up1_res")
    x = layers.Conv2DTranspose(w, 2, strides=2, name="up2")(x)
    x = layers.Add(name="skip_full")([x, full])
    x = residual_block(x, w, "up2_res")
    phase = layers.Conv2D(1, 3, padding="same", name="phase_conv")(x)
    outputs = {"phase": float32_output(phase, "phase")}
    if config.defocus_head:
        d = layers.GlobalAveragePooling2D(name="defocus_pool")(bottleneck)
        d = layers.Dense(4 * w, activation="relu", name="defocus_fc")(d)
        d = layers.Dense(1, name="defocus_out")(d)
        outputs["defocus_um"] = float32_output(d, "defocus_um")
    return keras.Model(inputs, outputs, name="refocus")
