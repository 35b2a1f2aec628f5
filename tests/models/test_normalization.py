"""Precise BatchNorm statistics: exact averages of the batch statistics, the model otherwise untouched."""
import keras
import numpy as np
import tensorflow as tf

from cellavie_hpc.models.normalization import recalibrate_batchnorm
from cellavie_hpc.models.registry import build_model


def test_moving_statistics_become_the_mean_of_batch_statistics():
    inputs = keras.Input((4,))
    norm = keras.layers.BatchNormalization(momentum=0.9, name="bn")
    drop = keras.layers.Dropout(0.5, name="drop")
    model = keras.Model(inputs, drop(norm(inputs)))
    norm.trainable = False  # as model.freeze_batchnorm leaves it
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, (16, 4)).astype(np.float32) for _ in range(5)]
    weights = [w.numpy().copy() for w in (norm.gamma, norm.beta)]
    assert recalibrate_batchnorm(model, iter(batches)) == 5
    np.testing.assert_allclose(norm.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(norm.moving_variance.numpy(), np.mean([b.var(0) for b in batches], 0), rtol=1e-4)
    assert (norm.momentum, norm.trainable, drop.rate) == (0.9, False, 0.5)
    for before, after in zip(weights, (norm.gamma, norm.beta)):
        np.testing.assert_array_equal(before, after.numpy())


def test_inference_matches_batch_statistics_after_recalibration():
    """Regression: after a short run the moving statistics (still near mean 0, variance 1) made inference differ
    from what training saw; recalibrated, inference on a batch equals the training-mode pass on that batch."""
    keras.utils.set_random_seed(3)
    model = build_model("classifier", "tiny", patch=16)
    x = tf.constant(np.random.default_rng(1).normal(1.5, 0.7, (32, 16, 16, 1)).astype(np.float32))
    train_mode = model(x, training=True)["logits"].numpy()
    assert np.abs(model(x, training=False)["logits"].numpy() - train_mode).max() > 1e-2
    recalibrate_batchnorm(model, [x])
    np.testing.assert_allclose(model(x, training=False)["logits"].numpy(), train_mode, atol=1e-3)


def test_classifier_recalibrates_on_batches_drawn_like_its_training_batches(tmp_path):
    """Regression: training drew class-balanced crops but recalibration drew natural (~95 % healthy) ones; the
    statistics then shifted every held-out crop towards "infected" (specificity 0.98 -> 0.51)."""
    from cellavie_hpc.data.pipeline import cell_labels
    from cellavie_hpc.data.synthetic import generate_dataset
    from cellavie_hpc.models.registry import model_spec
    from cellavie_hpc.train import loop
    from cellavie_hpc.train.config import resolve

    generate_dataset(tmp_path / "ds", images=2, size=256, parasitemia=0.1, seed=4, workers=1, progress=False)
    config = resolve({"run": {"name": "recal", "seed": 0},
                      "data": {"dataset": str(tmp_path / "ds"), "patch": 16, "eval_images": 0},
                      "model": {"name": "classifier", "preset": "tiny"},
                      "train": {"backend": "single", "batch_per_replica": 8, "steps": 1}})
    data = loop._prepare_data(config)
    natural = np.mean(cell_labels(data.dataset, data.train_plan.tiles, 16) > 0)
    spec = model_spec("classifier", "tiny", 16, 1)
    labels = np.concatenate([y["label"].numpy() for _, y in loop._recalibration_batches(config, data, spec, 1, 0, 8)])
    assert len(labels) == 8 * min(32, len(data.train_plan) // 8) and 0 < natural < 0.3
    assert 0.35 < np.mean(labels > 0) < 0.65, f"infected share {np.mean(labels > 0):.2f}, natural {natural:.2f}"
