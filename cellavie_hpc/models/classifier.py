"""R-CNN-style region classifier: a (C, C, 1) phase crop centred on one detected cell -> parasite stage logits.

Second stage of the chain: the detector proposes cells, this network looks at each one at full resolution and names
its stage {healthy, ring, trophozoite, schizont}. Infected stages are rare (parasitaemia of a few %), which the
pipeline's balanced sampling (half healthy, half infected crops) accounts for.
"""
from __future__ import annotations

import dataclasses

import keras
from keras import layers

from cellavie_hpc.models.unet import conv_bn_relu, float32_output, residual_block

#: Classes; label = pixel class of the truth raster - 1. "Infected" means any label but 0.
STAGES = ("healthy", "ring", "trophozoite", "schizont")


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """width: filters of the first stage (x2 per stage); stages: stride-2 stages; dropout before the logits;
    focal_gamma / class_weights: the loss's answer to imbalance the balanced sampling leaves. Default plain
    cross-entropy (gamma 0, equal weights): sampling already balances healthy/infected, and focal loss on top
    blurred the 0.5 call on P(infected) (measurements in docs/models.rst)."""
    width: int = 32
    stages: int = 4
    dropout: float = 0.2
    focal_gamma: float = 0.0
    class_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)


PRESETS = {
    "tiny": ClassifierConfig(width=8, stages=3, dropout=0.0),
    "base": ClassifierConfig(width=32, stages=4, dropout=0.2),
}


def min_patch_multiple(config: ClassifierConfig) -> int:
    return 2 ** config.stages


def build(config: ClassifierConfig, patch: int, in_channels: int) -> keras.Model:
    """(C, C, in_channels) -> {"logits": (4,)}."""
    inputs = keras.Input((patch, patch, in_channels), name="crop")
    x = conv_bn_relu(inputs, config.width, "stem")
    for stage in range(config.stages):
        filters = config.width * 2 ** stage
        x = conv_bn_relu(x, filters, f"stage{stage}_down", strides=2)
        x = residual_block(x, filters, f"stage{stage}_res")
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if config.dropout:
        x = layers.Dropout(config.dropout, name="dropout")(x)
    logits = layers.Dense(len(STAGES), name="logits_dense")(x)
    return keras.Model(inputs, {"logits": float32_output(logits, "logits")}, name="classifier")
