"""Horovod (0.28.1) + Keras 3 glue for the TensorFlow backend.

Horovod's last release predates Keras 3.  Its ``horovod.tensorflow`` ops work,
but two entry points assume the variables they get are ``tf.Variable``\\ s,
which Keras 3 variables (``keras.Variable``) are not:

* ``hvd.broadcast_variables(model.variables, 0)`` fails inside its
  ``tf.function`` with ``'SymbolicTensor' object has no attribute 'assign'``;
* ``hvd.DistributedGradientTape(tape).gradient(loss, model.trainable_variables)``
  fails with ``'Variable' object has no attribute 'ref'``.

On the TensorFlow backend every Keras 3 variable wraps a real ``tf.Variable``;
handing *that* to Horovod makes both work (verified: two ranks under
``horovodrun --gloo`` and ``mpirun`` end with bit-identical weights).  The
helpers below do exactly that, and nothing else, so Horovod itself stays
unpatched.

Do **not** use ``horovod.tensorflow.keras`` (``hvd.DistributedOptimizer`` +
``model.fit``) with Keras 3: it builds and trains, but gradients are *not*
averaged across ranks, so the ranks silently diverge.  Use a custom training
step with :func:`distributed_gradients` instead, and
:func:`assert_variables_in_sync` to catch divergence.

Horovod is imported by the caller and passed in as ``hvd`` (the
``horovod.tensorflow`` module), so this module can be imported - and its
``tf_variables`` used - where Horovod is not installed.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Sequence

import tensorflow as tf

__all__ = [
    "tf_variables",
    "broadcast_keras_variables",
    "distributed_gradients",
    "assert_variables_in_sync",
]


def _as_tf_variable(var: Any) -> tf.Variable:
    if isinstance(var, tf.Variable):
        return var
    # keras.Variable on the TF backend: ``.value`` is the wrapped tf.Variable
    # (outside an autocast scope); ``_value`` is the storage attribute itself.
    for attr in ("value", "_value"):
        inner = getattr(var, attr, None)
        if isinstance(inner, tf.Variable):
            return inner
    raise TypeError(
        f"{type(var).__module__}.{type(var).__name__} {getattr(var, 'path', getattr(var, 'name', ''))!r} "
        "does not wrap a tf.Variable; Horovod's TensorFlow ops need the TensorFlow "
        "Keras backend (KERAS_BACKEND=tensorflow) and an initialised (built) model"
    )


def tf_variables(variables: Iterable[Any]) -> List[tf.Variable]:
    """Return the ``tf.Variable`` behind each (Keras 3 or TF) variable, in order.

    Horovod only accepts ``tf.Variable``; Keras 3 variables wrap one on the
    TensorFlow backend.  ``tf.Variable`` inputs are returned unchanged.
    """
    return [_as_tf_variable(v) for v in variables]


def broadcast_keras_variables(hvd: Any, variables: Iterable[Any], root_rank: int = 0) -> None:
    """Overwrite ``variables`` on every rank with their values on ``root_rank``.

    Call once after the model (and optimizer, if its slots must match) is
    built, before the first step.  Wraps ``hvd.broadcast_variables``, which
    fails on Keras 3 variables themselves.
    """
    hvd.broadcast_variables(tf_variables(variables), root_rank=root_rank)


def distributed_gradients(
    hvd: Any,
    tape: tf.GradientTape,
    loss: tf.Tensor,
    variables: Sequence[Any],
    **tape_kwargs: Any,
) -> List[tf.Tensor]:
    """Gradients of ``loss`` w.r.t. ``variables``, averaged over all ranks.

    Equivalent to ``hvd.DistributedGradientTape(tape, **tape_kwargs)
    .gradient(loss, variables)`` but works with Keras 3 variables (which
    ``DistributedGradientTape`` rejects).  The returned list is aligned with
    ``variables`` and can go straight into
    ``optimizer.apply_gradients(zip(grads, variables))``.
    """
    dtape = hvd.DistributedGradientTape(tape, **tape_kwargs)
    return dtape.gradient(loss, tf_variables(variables))


def assert_variables_in_sync(hvd: Any, variables: Iterable[Any], root_rank: int = 0,
                             name: str = "variables") -> None:
    """Raise ``RuntimeError`` on every rank unless all ranks hold bit-identical values.

    Collective: every rank must call it with the same variables.  Each rank
    compares its values with ``root_rank``'s (broadcast) exactly - no
    tolerance - and the per-rank verdicts are combined with an allreduce, so
    all ranks agree on the result.  Cheap enough to run every few hundred
    steps; it catches silent desynchronisation such as the
    ``horovod.tensorflow.keras`` + Keras 3 problem.
    """
    tf_vars = tf_variables(variables)
    mismatched = []
    for i, var in enumerate(tf_vars):
        mine = tf.convert_to_tensor(var)
        ref = hvd.broadcast(mine, root_rank=root_rank, name=f"hvd_compat_sync_check_{i}")
        # Compare bit patterns so that NaNs and -0.0 count as equal only if identical.
        if mine.dtype.is_floating:
            bits = {2: tf.int16, 4: tf.int32, 8: tf.int64}[mine.dtype.size]
            same = tf.reduce_all(tf.equal(tf.bitcast(mine, bits), tf.bitcast(ref, bits)))
        else:
            same = tf.reduce_all(tf.equal(mine, ref))
        if not bool(same):
            mismatched.append(var.name)
    bad_here = tf.constant([1.0 if mismatched else 0.0], dtype=tf.float32)
    bad_ranks = int(hvd.allreduce(bad_here, op=hvd.Sum, name="hvd_compat_sync_verdict").numpy()[0])
    if bad_ranks:
        detail = f"; on rank {hvd.rank()}: {mismatched[:5]}" if mismatched else ""
        raise RuntimeError(
            f"{name} out of sync: {bad_ranks} of {hvd.size()} ranks differ from rank {root_rank}{detail}"
        )
