"""Precise BatchNorm statistics: re-estimate the moving mean and variance with the final weights.

BatchNorm normalises with the batch's statistics in training and with moving averages at inference. The
averages trail the weights (momentum 0.9: ~10 batches of a changing network) and, at small per-replica batches,
are noisy; a short run then evaluates on statistics that fit no real batch, and a network with small decision
margins (the classifier on rare infected cells) flips its answers: train accuracy 0.95 with batch statistics fell
to 0.33 with the moving ones. Recomputing them over a few hundred training samples with the weights frozen
(Wu & Johnson, "Rethinking Batch in BatchNorm", 2021) makes inference see the statistics training saw.
"""
from __future__ import annotations

from collections.abc import Iterable

import keras


def recalibrate_batchnorm(model: keras.Model, batches: Iterable) -> int:
    """Set every BatchNormalization layer's moving statistics to the average over `batches` of training inputs.

    Each batch runs forward in training mode (trainable weights untouched, dropout off) with the momentum of batch k
    set to (k-1)/k, so after N batches the moving mean and variance are the exact means of the N batch statistics.
    Returns N. A model without BatchNorm, or no batch, leaves the model as it was.
    """
    norms = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    drops = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dropout)]
    if not norms:
        return 0
    saved = [(layer.momentum, layer.trainable) for layer in norms], [layer.rate for layer in drops]
    count = 0
    try:
        for layer in drops:
            layer.rate = 0.0
        for layer in norms:
            layer.trainable = True  # frozen BatchNorm ignores training=True
        for x in batches:
            count += 1
            for layer in norms:
                layer.momentum = (count - 1) / count
            model(x, training=True)
    finally:
        for layer, (momentum, trainable) in zip(norms, saved[0]):
            layer.momentum, layer.trainable = momentum, trainable
        for layer, rate in zip(drops, saved[1]):
            layer.rate = rate
    return count
