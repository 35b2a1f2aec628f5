"""The four models: shapes, sizes, training with a plain GradientTape loop, mixed precision, decoding, registry."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from model_tiles import defocused_field, disc_rasters, random_tiles

from cellavie_hpc.errors import ConfigError, DataError
from cellavie_hpc.models import metrics
from cellavie_hpc.models.detector import decode_detections, non_max_suppression, target_boxes
from cellavie_hpc.models import losses
from cellavie_hpc.models.registry import LIST_SUFFIX, MODELS, build_model, model_spec
from cellavie_hpc.models.targets import cell_boxes, detector_targets

PATCH = {"refocus": 32, "unet": 32, "detector": 32, "classifier": 16}


def synthetic_batch(name: str, count: int = 8, seed: int = 0, **options):
    """(inputs, targets) of the model's input kind, targets made by the spec through tf.data as the pipeline does."""
    rng = np.random.default_rng(seed)
    patch = PATCH[name]
    if name == "classifier":
        tiles = [disc_rasters(patch, [(7.5, 7.5, float(rng.uniform(3, 5)), 1 + i % 4)]) for i in range(count)]
        instance, cls, phase = (np.stack(a) for a in zip(*tiles))
    else:
        instance, cls, phase = random_tiles(rng, count, patch)
    truth = {"instance": instance, "cls": cls, "phase": phase,
             "focus_distance_m": rng.uniform(-20e-6, 20e-6, count).astype(np.float32)}
    spec = model_spec(name, "tiny", patch=patch, **options)
    (y,) = tf.data.Dataset.from_tensor_slices(truth).map(spec.targets.from_truth).batch(count).take(1)
    x = defocused_field(phase) if name == "refocus" else phase[..., None]
    return tf.constant(x), y


def train(model, spec, x, y, steps: int, learning_rate: float = 1e-2) -> list[float]:
    """Eager GradientTape steps: for a dozen steps of a tiny model, cheaper than tracing a tf.function."""
    optimizer = keras.optimizers.Adam(learning_rate)
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = spec.loss(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("name", list(MODELS))
def test_tiny_model_shapes_and_size(name):
    patch = PATCH[name]
    model = build_model(name, "tiny", patch=patch)
    assert 10_000 <= model.count_params() <= 100_000
    spec = model_spec(name, "tiny", patch=patch)
    out = model(np.zeros((3,) + spec.input_shape, np.float32))
    expected = {k: (3,) + (s if s else (4,)) for k, s in spec.targets.shapes.items() if k != "mask"}
    expected = {"logits": (3, patch, patch, 3)} if name == "unet" else expected
    expected = {"logits": (3, 4)} if name == "classifier" else expected
    assert {k: tuple(v.shape) for k, v in out.items()} == expected
    assert all(v.dtype == tf.float32 for v in out.values())


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_and_metrics_run_in_a_graph(name):
    x, y = synthetic_batch(name, count=2)
    model = build_model(name, "tiny", patch=PATCH[name])
    spec = model_spec(name, "tiny", patch=PATCH[name])

    @tf.function
    def evaluate():
        out = model(x, training=False)
        return spec.loss(y, out), spec.metrics(y, out)

    loss, batch = evaluate()
    assert loss.dtype == tf.float32 and loss.shape == () and math.isfinite(float(loss))
    assert float(loss) == pytest.approx(float(spec.loss(y, model(x, training=False))), rel=1e-4)
    scalars = {k: v for k, v in batch.items() if not k.endswith(LIST_SUFFIX)}
    assert all(v.shape == () and v.dtype == tf.float32 for v in scalars.values())
    assert all(v.shape[0] == 2 for k, v in batch.items() if k.endswith(LIST_SUFFIX))
    reduced = spec.reduce_metrics([batch, batch])
    assert not any(k.endswith(LIST_SUFFIX) for k in reduced) and all(isinstance(v, float) for v in reduced.values())
    if name == "detector":
        assert {"map50", "cell_ap50", "ap50_healthy", "ap50_infected"} <= set(reduced)


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_falls_on_synthetic_discs(name):
    keras.utils.set_random_seed(7)
    options = {"defocus_head": True} if name == "refocus" else {}  # both refocus heads learn
    x, y = synthetic_batch(name, count=4, **options)
    model = build_model(name, "tiny", patch=PATCH[name], **options)
    spec = model_spec(name, "tiny", patch=PATCH[name], **options)
    losses = train(model, spec, x, y, steps=10)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_spec_metrics_reduce_exactly_over_batches():
    spec = model_spec("classifier", "tiny", patch=16)
    logits = np.eye(4, dtype=np.float32)[[0, 1, 1, 0]] * 5  # predicted: healthy, ring, ring, healthy
    first = spec.metrics({"label": np.array([0, 1, 2, 0])}, {"logits": logits[:4]})
    second = spec.metrics({"label": np.array([0, 0])}, {"logits": logits[:2]})  # no infected cell: NaN sensitivity
    assert math.isnan(float(second["sensitivity"]))
    total = spec.reduce_metrics([first, second])
    # tp: 2 (ring, troph->ring), fn 0, fp 1 (second batch healthy->ring), tn 3
    assert total["sensitivity"] == pytest.approx(1.0)
    assert total["specificity"] == pytest.approx(3 / 4)
    assert total["precision"] == pytest.approx(2 / 3)
    assert total["accuracy"] == pytest.approx(4 / 6)


def test_unet_metrics_hand_checked():
    spec = model_spec("unet", "tiny", patch=16)
    labels = np.zeros((1, 16, 16), np.int32)
    labels[0, 4:8, 4:8] = 1
    predicted = np.zeros((1, 16, 16), np.int32)
    predicted[0, 4:8, 4:10] = 1
    out = spec.reduce_metrics([spec.metrics({"classes": labels}, {"logits": np.eye(3, dtype=np.float32)[predicted]})])
    assert out["iou_interior"] == pytest.approx(16 / 24)
    assert out["dice_interior"] == pytest.approx(32 / 40)
    assert out["iou_boundary"] == 1.0  # absent from both
    assert out["pixel_accuracy"] == pytest.approx(1 - 8 / 256)


@pytest.fixture
def mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("name", ["refocus", "detector"])
def test_mixed_float16_computes_in_half_and_returns_float32_loss(name, mixed_precision):
    options = {"defocus_head": True} if name == "refocus" else {}
    model = build_model(name, "tiny", patch=PATCH[name], **options)
    spec = model_spec(name, "tiny", patch=PATCH[name], **options)
    assert model.get_layer("stem_conv" if name == "refocus" else "stem1_conv").compute_dtype == "float16"
    x, y = synthetic_batch(name, count=2, **options)
    out = model(x, training=True)
    assert all(v.dtype == tf.float32 for v in out.values())
    loss = spec.loss(y, out)
    assert loss.dtype == tf.float32 and loss.shape == () and math.isfinite(float(loss))


def test_nms_removes_duplicates_and_keeps_separate_cells():
    boxes = np.array([[[0, 0, 10, 10], [0, 1, 10, 11], [20, 20, 30, 30], [1, 0, 11, 10]]], np.float32)
    scores = np.array([[0.9, 0.8, 0.7, 0.6]], np.float32)
    keep = keras.ops.convert_to_numpy(non_max_suppression(boxes, scores, iou_threshold=0.5))
    assert keep.tolist() == [[True, False, True, False]]
    # a box suppressed by a suppressed box survives: greedy, not "fast" NMS
    chain = np.array([[[0, 0, 10, 10], [0, 4, 10, 14], [0, 8, 10, 18]]], np.float32)
    keep = keras.ops.convert_to_numpy(non_max_suppression(chain, scores[:, :3], iou_threshold=0.4))
    assert keep.tolist() == [[True, False, True]]


def logits_from_targets(t, duplicate_at=None):
    """Perfect detector outputs (batch of 1) from targets, optionally with a second, weaker peak next to a cell."""
    heat = t["heatmap"].numpy().copy()
    if duplicate_at is not None:
        heat[duplicate_at] = 0.95  # after max-pool it is not the local peak, and NMS must remove its box anyway
    logit = np.log(np.clip(heat, 1e-6, 1 - 1e-6) / (1 - np.clip(heat, 1e-6, 1 - 1e-6)))
    return {"heatmap": logit[None], "size": t["size"].numpy()[None], "offset": t["offset"].numpy()[None]}


def test_decode_recovers_ground_truth_boxes_and_map_is_one():
    instance, cls, _ = disc_rasters(64, [(13.5, 9.5, 4.0, 1), (40.0, 41.0, 5.0, 2), (45.0, 12.0, 4.5, 1)])
    t = detector_targets(instance, cls)
    det = {k: keras.ops.convert_to_numpy(v)[0] for k, v in decode_detections(logits_from_targets(t), 0.5, 20).items()}
    assert int(det["valid"].sum()) == 3
    gt_boxes, gt_classes = (v.numpy() for v in cell_boxes(instance, cls))
    found = det["boxes"][det["valid"]]
    order = np.lexsort((found[:, 1], found[:, 0]))
    np.testing.assert_allclose(found[order], gt_boxes[np.lexsort((gt_boxes[:, 1], gt_boxes[:, 0]))], atol=1e-4)
    valid = det["valid"]
    out = metrics.mean_average_precision(
        [{"boxes": det["boxes"][valid], "scores": det["scores"][valid], "classes": det["classes"][valid]}],
        [{"boxes": gt_boxes, "classes": gt_classes}], num_classes=2)
    assert out["map"] == pytest.approx(1.0)


def test_decode_suppresses_a_duplicate_peak_of_another_class():
    instance, cls, _ = disc_rasters(32, [(13.5, 9.5, 4.0, 1)])
    t = detector_targets(instance, cls)
    outputs = logits_from_targets(t, duplicate_at=(3, 2, 1))  # same cell, "infected" channel, slightly weaker
    det = decode_detections(outputs, score_threshold=0.5, max_detections=10)
    valid = keras.ops.convert_to_numpy(det["valid"])[0]
    assert valid.sum() == 1 and int(keras.ops.convert_to_numpy(det["classes"])[0][valid][0]) == 0
    per_class = decode_detections(outputs, score_threshold=0.5, max_detections=10, class_agnostic=False)
    assert keras.ops.convert_to_numpy(per_class["valid"]).sum() == 2


def test_registry_rejects_bad_requests_with_suggestions():
    with pytest.raises(ConfigError, match="did you mean 'detector'"):
        build_model("detecter")
    with pytest.raises(ConfigError, match="multiple of 16"):
        build_model("detector", "base", patch=100)
    with pytest.raises(ConfigError, match="did you mean 'width'"):
        build_model("unet", "tiny", widht=4)
    with pytest.raises(ConfigError, match="2 x angles"):
        build_model("refocus", "tiny", in_channels=3)
    head = model_spec("refocus", "tiny", patch=16, defocus_head=True)
    with pytest.raises(DataError, match="focus_distance_m"):
        head.targets.from_truth({"phase": np.zeros((16, 16), np.float32)})
    phase = np.zeros((1, 16, 16, 1), np.float32)
    with pytest.raises(DataError, match="got a single tensor; .* defocus_head=False"):
        head.loss(phase, {"phase": phase})
    with pytest.raises(DataError, match=r"\['defocus_um'\] are missing"):
        head.metrics({"phase": phase}, {"phase": phase})
    assert set(build_model("refocus", "tiny", patch=16, defocus_head=True).output) == {"phase", "defocus_um"}
    spec = model_spec("refocus", "tiny", patch=16, dilations=[1, 2])
    assert spec.config.dilations == (1, 2) and set(spec.targets.shapes) == {"phase"}
    assert set(build_model("refocus", "tiny", patch=16).output) == {"phase"}


def test_single_target_models_accept_the_bare_tensor():
    spec = model_spec("unet", "tiny", patch=16)
    labels = np.zeros((1, 16, 16), np.int32)
    labels[0, 4:8, 4:8] = 1
    logits = {"logits": np.eye(3, dtype=np.float32)[labels] * 4}
    assert float(spec.loss(labels, logits)) == pytest.approx(float(spec.loss({"classes": labels}, logits)))
    assert float(spec.metrics(labels, logits)["iou_interior"]) == 1.0


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_gradient_is_finite_on_confident_predictions(gamma):
    """Regression: (1 - p)^gamma had a NaN gradient where p rounds to 1 (gamma 0: 0 * inf), which stopped a U-Net run."""
    logits = tf.Variable([[60.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    with tf.GradientTape() as tape:
        loss = losses.softmax_focal_loss(np.array([0, 1]), logits, gamma=gamma, class_weights=(1.0, 1.0, 3.0))
    grad = tape.gradient(loss, logits).numpy()
    assert np.isfinite(grad).all() and np.abs(grad[1]).max() > 0
    if gamma == 0.0:  # plain cross-entropy
        p = tf.nn.softmax(logits).numpy()
        assert float(loss) == pytest.approx(float(np.mean(-np.log(p[[0, 1], [0, 1]]))), rel=1e-5)


def test_detector_spec_scores_map_from_decoded_tiles():
    """The engine's generic evaluation gets mAP@0.5: perfect outputs score 1, a missed cell lowers recall."""
    instance, cls, _ = disc_rasters(32, [(9.5, 9.5, 4.0, 1), (22.0, 21.0, 5.0, 3)])
    t = {k: v[None] for k, v in detector_targets(instance, cls).items()}
    boxes = keras.ops.convert_to_numpy(target_boxes(t)["boxes"])[0][t["mask"].numpy()[0, ..., 0].reshape(-1) > 0]
    want = cell_boxes(instance, cls)[0].numpy()
    np.testing.assert_allclose(boxes[np.argsort(boxes[:, 0])], want[np.argsort(want[:, 0])], atol=1e-5)
    spec = model_spec("detector", "tiny", patch=32)
    perfect = logits_from_targets({k: v[0] for k, v in t.items()})
    out = spec.reduce_metrics([spec.metrics(t, perfect)] * 3)
    assert out["map50"] == pytest.approx(1.0) and out["cell_ap50"] == pytest.approx(1.0)
    missed = dict(perfect, heatmap=np.where(perfect["heatmap"][..., 1:] > 0, -9.0, perfect["heatmap"][..., 1:]))
    missed["heatmap"] = np.concatenate([perfect["heatmap"][..., :1], missed["heatmap"]], axis=-1)
    out = spec.reduce_metrics([spec.metrics(t, missed)])
    assert out["ap50_healthy"] == pytest.approx(1.0) and out["ap50_infected"] == 0.0
    assert out["map50"] == pytest.approx(0.5) and out["cell_ap50"] == pytest.approx(0.5)
