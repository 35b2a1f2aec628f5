"""Loss functions (keras.ops only, any back-end). Every loss computes in float32 and returns a float32 scalar,
so mixed-precision models (float16 activations) still get a float32 loss to scale and reduce.
"""
from __future__ import annotations

from collections.abc import Sequence

from keras import ops


def _f32(x):
    return ops.cast(x, "float32")


def centre_focal_loss(heatmap_true, heatmap_logits, alpha: float = 2.0, beta: float = 4.0):
    """CenterNet's penalty-reduced focal loss on a Gaussian target heatmap, normalised by the number of peaks.

    Pixels near (not at) a centre are down-weighted by (1 - target)^beta, so the net is not punished for a
    response one pixel off a cell centre; the focal term (1 - p)^alpha keeps the empty background from dominating.
    """
    y = _f32(heatmap_true)
    logits = _f32(heatmap_logits)
    p = ops.clip(ops.sigmoid(logits), 1e-4, 1.0 - 1e-4)
    log_p = ops.log(p)
    log_not_p = ops.log(1.0 - p)
    positive = ops.cast(y >= 1.0 - 1e-4, "float32")
    pos_loss = -positive * ops.power(1.0 - p, alpha) * log_p
    neg_loss = -(1.0 - positive) * ops.power(1.0 - y, beta) * ops.power(p, alpha) * log_not_p
    num_pos = ops.maximum(ops.sum(positive), 1.0)
    return (ops.sum(pos_loss) + ops.sum(neg_loss)) / num_pos


def masked_l1(y_true, y_pred, mask):
    """Mean absolute error over the positions where ``mask`` is 1 (broadcast over the last axis); 0 if none."""
    mask = _f32(mask)
    err = ops.abs(_f32(y_true) - _f32(y_pred)) * mask
    count = ops.sum(mask * ops.ones_like(err))
    return ops.sum(err) / ops.maximum(count, 1.0)


def softmax_focal_loss(labels, logits, gamma: float = 2.0, class_weights: Sequence[float] | None = None):
    """Multi-class focal loss, mean over samples: -w_c (1 - p_c)^gamma log p_c for the true class c.

    gamma > 0 shifts the gradient onto hard (often rare-stage) samples; ``class_weights`` re-weights classes for the
    remaining imbalance the pipeline's balanced sampling leaves. gamma = 0 and no weights is cross-entropy.
    """
    logits = _f32(logits)
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    num_classes = logits.shape[-1]
    log_probs = ops.log_softmax(ops.reshape(logits, (-1, num_classes)), axis=-1)
    onehot = ops.one_hot(labels, num_classes, dtype="float32")
    log_pt = ops.sum(onehot * log_probs, axis=-1)
    loss = -log_pt
    if gamma:
        # The floor keeps the gradient finite where p_t rounds to 1: d/dp (1 - p)^gamma is infinite there for
        # gamma < 1 (and 0 * inf = NaN for gamma = 0, which is why gamma 0 skips the term altogether).
        loss = ops.power(ops.maximum(1.0 - ops.exp(log_pt), 1e-12), gamma) * loss
    if class_weights is not None:
        weights = ops.convert_to_tensor(list(class_weights), dtype="float32")
        w = ops.sum(onehot * weights[None, :], axis=-1)
        return ops.sum(w * loss) / ops.maximum(ops.sum(w), 1e-6)
    return ops.mean(loss)


def soft_dice_loss(labels, logits, classes: Sequence[int]):
    """1 - mean soft Dice over ``classes`` (pixel labels int (B, H, W), logits (B, H, W, K)); batch-pooled."""
    logits = _f32(logits)
    probs = ops.softmax(logits, axis=-1)
    onehot = ops.one_hot(ops.cast(labels, "int32"), logits.shape[-1], dtype="float32")
    dice = []
    for c in classes:
        inter = ops.sum(probs[..., c] * onehot[..., c])
        total = ops.sum(probs[..., c]) + ops.sum(onehot[..., c])
        dice.append((2.0 * inter + 1.0) / (total + 1.0))
    return 1.0 - ops.mean(ops.stack(dice))


def mean_squared_error(y_true, y_pred):
    """Mean squared error in float32."""
    return ops.mean(ops.square(_f32(y_true) - _f32(y_pred)))


def huber(y_true, y_pred, delta: float = 1.0):
    """Mean Huber loss: quadratic within ``delta``, linear outside (robust to outlying defocus labels)."""
    err = ops.abs(_f32(y_true) - _f32(y_pred))
    quad = ops.minimum(err, delta)
    return ops.mean(0.5 * quad * quad + delta * (err - quad))
