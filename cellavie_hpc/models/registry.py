"""One entry point for the training engine: ``build_model`` and ``model_spec`` by name and preset.

The engine stays generic: it feeds ``spec.input_kind`` inputs, maps ``spec.targets.from_truth`` over the truth
rasters in tf.data, and calls ``spec.loss`` / ``spec.metrics`` on the model's output dict. Model outputs are always
a dict of float32 tensors (also under mixed precision).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

import keras
import numpy as np
from keras import ops

from cellavie_hpc.config import suggest
from cellavie_hpc.errors import ConfigError, DataError
from cellavie_hpc.models import classifier, detector, losses, metrics, refocus, unet

MODELS: dict[str, ModuleType] = {"refocus": refocus, "unet": unet, "detector": detector, "classifier": classifier}
PRESETS = ("tiny", "base")
#: What the pipeline feeds each model: the defocused field as real/imag channels per angle, the in-focus phase
#: (P, P, 1), or a phase crop (C, C, 1) centred on one cell.
INPUT_KINDS = {"refocus": "field", "unet": "phase", "detector": "phase", "classifier": "crop"}
DEFAULT_PATCH = {"refocus": 128, "unet": 128, "detector": 128, "classifier": 64}
DEFAULT_CHANNELS = {"refocus": 2, "unet": 1, "detector": 1, "classifier": 1}
#: Metric keys ending in this are additive counts: ``reduce_metrics`` sums them (other keys are averaged) and
#: recomputes the ratios from the sums, so a set-level IoU or sensitivity is exact, not a mean of batch ratios.
TOTAL_SUFFIX = "_total"
#: Metric keys ending in this are per-sample arrays (leading batch axis), for set-level metrics that are not sums of
#: batch counts (detector mAP): ``reduce_metrics`` concatenates them, hands them to ``derive`` and leaves them out.
LIST_SUFFIX = "_list"


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """Per-sample (unbatched) target tensors: name -> shape and dtype, and how to make them from the truth.

    ``from_truth(truth)`` takes a mapping of tf tensors ``phase`` (P, P) float32, ``instance`` (P, P) int32,
    ``cls`` (P, P) int32 and, for a refocus model with a defocus head, ``focus_distance_m`` () float32; it uses
    TensorFlow ops only, so ``dataset.map`` can run it.
    """
    shapes: Mapping[str, tuple[int, ...]]
    dtypes: Mapping[str, str]
    from_truth: Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything the training engine needs to train and score one model generically.

    ``loss(y_true, y_pred)`` -> float32 scalar; ``metrics(y_true, y_pred)`` -> dict of float32 scalars for one batch;
    ``reduce_metrics(batches)`` -> dict of floats over many batches (see ``TOTAL_SUFFIX``). ``y_true`` is the dict
    of ``targets.shapes`` keys; a model with one target also takes the bare tensor. ``y_pred`` is the model output.
    """
    name: str
    preset: str
    config: Any
    patch: int
    in_channels: int
    input_kind: str
    input_shape: tuple[int, int, int]
    targets: TargetSpec
    loss: Callable[[Mapping[str, Any], Mapping[str, Any]], Any]
    metrics: Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]
    derive: Callable[[dict[str, float]], dict[str, float]]

    def reduce_metrics(self, batches: Sequence[Mapping[str, Any]]) -> dict[str, float]:
        """Sum the ``*_total`` counts, average the other scalars, concatenate the ``*_list`` arrays, then derive the
        set-level values (ratios from the summed counts, mAP from the lists); the lists are not returned."""
        if not batches:
            return {}
        out: dict[str, float] = {}
        lists: dict[str, np.ndarray] = {}
        for key in batches[0]:
            if key.endswith(LIST_SUFFIX):
                lists[key] = np.concatenate([np.asarray(ops.convert_to_numpy(b[key])) for b in batches])
                continue
            values = [float(ops.convert_to_numpy(b[key])) for b in batches]
            out[key] = math.fsum(values) if key.endswith(TOTAL_SUFFIX) else math.fsum(values) / len(values)
        out.update(self.derive({**out, **lists}))
        return out


def _resolve(name: str, preset: str, patch: int | None, in_channels: int | None, options: Mapping[str, Any]):
    if name not in MODELS:
        raise ConfigError(f"model.name: unknown model {name!r}{suggest(name, MODELS)}; choose one of "
                          f"{', '.join(MODELS)}")
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}{suggest(preset, PRESETS)}; choose tiny or base")
    module = MODELS[name]
    config = module.PRESETS[preset]
    fields = {f.name for f in dataclasses.fields(config)}
    for key in options:
        if key not in fields:
            raise ConfigError(f"model option {key!r} is not an option of {name}{suggest(key, fields)}; "
                              f"options: {', '.join(sorted(fields))}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    config = dataclasses.replace(config, **options)
    patch = DEFAULT_PATCH[name] if patch is None else patch
    in_channels = DEFAULT_CHANNELS[name] if in_channels is None else in_channels
    multiple = module.min_patch_multiple(config)
    if not isinstance(patch, int) or patch <= 0 or patch % multiple:
        raise ConfigError(f"data.patch: {name} ({preset}) needs a positive multiple of {multiple} pixels, got {patch}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ConfigError(f"model in_channels must be a positive integer, got {in_channels}")
    if name == "refocus" and in_channels % 2:
        raise ConfigError(f"refocus in_channels must be 2 x angles (real, imag per angle), got {in_channels}")
    if name == "detector" and config.num_classes not in (2, 4):
        raise ConfigError(f"detector num_classes must be 2 (healthy/infected) or 4 (stages), got {config.num_classes}")
    return module, config, patch, in_channels


def build_model(name: str, preset: str = "tiny", patch: int | None = None, in_channels: int | None = None,
                **options: Any) -> keras.Model:
    """Build model ``name`` (refocus, unet, detector, classifier) at ``preset``; ``options`` override preset fields.

    Uses the global Keras dtype policy (set ``mixed_float16`` before building for mixed precision); outputs stay
    float32. ``patch`` is the square input size in pixels (crop size for the classifier).
    """
    module, config, patch, in_channels = _resolve(name, preset, patch, in_channels, options)
    return module.build(config, patch, in_channels)


def model_spec(name: str, preset: str = "tiny", patch: int | None = None, in_channels: int | None = None,
               **options: Any) -> ModelSpec:
    """The ``ModelSpec`` matching ``build_model`` with the same arguments."""
    _, config, patch, in_channels = _resolve(name, preset, patch, in_channels, options)
    parts = _SPECS[name](config, patch)
    as_dict = _target_dict(name, tuple(parts["targets"].shapes))
    loss, batch_metrics = parts.pop("loss"), parts.pop("metrics")
    return ModelSpec(name=name, preset=preset, config=config, patch=patch, in_channels=in_channels,
                     input_kind=INPUT_KINDS[name], input_shape=(patch, patch, in_channels),
                     loss=lambda y_true, y_pred: loss(as_dict(y_true), y_pred),
                     metrics=lambda y_true, y_pred: batch_metrics(as_dict(y_true), y_pred), **parts)


def _target_dict(name: str, keys: tuple[str, ...]) -> Callable[[Any], Mapping[str, Any]]:
    """Accept the target dict, or for a one-target model the bare tensor, and name what is missing."""
    fix = "make them with spec.targets.from_truth" + (" or build with defocus_head=False" if name == "refocus" else "")

    def as_dict(y_true):
        if not isinstance(y_true, Mapping):
            if len(keys) == 1:
                return {keys[0]: y_true}
            raise DataError(f"{name} targets are a dict with the keys {list(keys)}, got a single tensor; {fix}")
        missing = [k for k in keys if k not in y_true]
        if missing:
            raise DataError(f"{name} targets need the keys {list(keys)} but {missing} are missing; {fix}")
        return y_true
    return as_dict


def _truth(truth: Mapping[str, Any], key: str, name: str):
    if key not in truth:
        raise DataError(f"{name} targets need the truth key {key!r}, got keys {sorted(truth)}")
    return truth[key]


def _refocus_spec(config: refocus.RefocusConfig, patch: int) -> dict[str, Any]:
    def from_truth(truth):
        from cellavie_hpc.models.targets import refocus_targets
        focus = _truth(truth, "focus_distance_m", "refocus") if config.defocus_head else None
        return refocus_targets(_truth(truth, "phase", "refocus"), focus)

    shapes = {"phase": (patch, patch, 1)}
    if config.defocus_head:
        shapes["defocus_um"] = (1,)

    def loss(y_true, y_pred):
        total = losses.mean_squared_error(y_true["phase"], y_pred["phase"])
        if config.defocus_head:
            scale = config.defocus_scale_um
            total += config.defocus_weight * losses.huber(ops.cast(y_true["defocus_um"], "float32") / scale,
                                                          y_pred["defocus_um"] / scale)
        return total

    def batch_metrics(y_true, y_pred):
        err = ops.square(ops.cast(y_true["phase"], "float32") - y_pred["phase"])
        out = {"phase_rmse_rad": metrics.phase_rmse(y_true["phase"], y_pred["phase"]),
               "phase_sq_err_total": ops.sum(err), "pixel_total": ops.cast(ops.size(err), "float32")}
        if config.defocus_head:
            out["defocus_mae_um"] = ops.mean(ops.abs(ops.cast(y_true["defocus_um"], "float32") - y_pred["defocus_um"]))
        return out

    def derive(r):
        return {"phase_rmse_rad": math.sqrt(r["phase_sq_err_total"] / r["pixel_total"])} if r["pixel_total"] else {}

    return {"targets": TargetSpec(shapes, {k: "float32" for k in shapes}, from_truth), "loss": loss,
            "metrics": batch_metrics, "derive": derive}


def _segmentation_ratios(inter, true, pred) -> dict[str, Any]:
    iou = metrics.iou_from_counts(inter, true, pred)
    dice = metrics.dice_from_counts(inter, true, pred)
    out = {}
    for c in (1, 2):
        out[f"iou_{unet.CLASSES[c]}"] = iou[c]
        out[f"dice_{unet.CLASSES[c]}"] = dice[c]
    out["miou_cells"] = (iou[1] + iou[2]) / 2
    return out


def _unet_spec(config: unet.UNetConfig, patch: int) -> dict[str, Any]:
    def from_truth(truth):
        from cellavie_hpc.models.targets import segmentation_targets
        return {"classes": segmentation_targets(_truth(truth, "instance", "unet"))}

    weights = (1.0, 1.0, config.boundary_weight)

    def loss(y_true, y_pred):
        ce = losses.softmax_focal_loss(y_true["classes"], y_pred["logits"], gamma=0.0, class_weights=weights)
        return ce + losses.soft_dice_loss(y_true["classes"], y_pred["logits"], classes=(1, 2))

    def batch_metrics(y_true, y_pred):
        predicted = ops.argmax(y_pred["logits"], axis=-1)
        inter, true, pred = metrics.confusion_counts(y_true["classes"], predicted, unet.NUM_CLASSES)
        out = _segmentation_ratios(inter, true, pred)
        out["pixel_accuracy"] = ops.sum(inter) / ops.sum(true)
        for c, cname in enumerate(unet.CLASSES):
            out[f"inter_{cname}_total"] = inter[c]
            out[f"true_{cname}_total"] = true[c]
            out[f"pred_{cname}_total"] = pred[c]
        return out

    def derive(r):
        counts = [[r[f"{kind}_{c}_total"] for c in unet.CLASSES] for kind in ("inter", "true", "pred")]
        tensors = [ops.convert_to_tensor(c, dtype="float32") for c in counts]
        out = {k: float(ops.convert_to_numpy(v)) for k, v in _segmentation_ratios(*tensors).items()}
        out["pixel_accuracy"] = sum(counts[0]) / max(sum(counts[1]), 1.0)
        return out

    return {"targets": TargetSpec({"classes": (patch, patch)}, {"classes": "int32"}, from_truth), "loss": loss,
            "metrics": batch_metrics, "derive": derive}


def _detector_spec(config: detector.DetectorConfig, patch: int) -> dict[str, Any]:
    def from_truth(truth):
        from cellavie_hpc.models.targets import detector_targets
        return detector_targets(_truth(truth, "instance", "detector"), _truth(truth, "cls", "detector"),
                                stride=detector.STRIDE, num_classes=config.num_classes)

    grid = patch // detector.STRIDE
    shapes = {"heatmap": (grid, grid, config.num_classes), "size": (grid, grid, 2), "offset": (grid, grid, 2),
              "mask": (grid, grid, 1)}

    def parts(y_true, y_pred):
        return {"heatmap_loss": losses.centre_focal_loss(y_true["heatmap"], y_pred["heatmap"]),
                "size_loss": losses.masked_l1(y_true["size"], y_pred["size"], y_true["mask"]),
                "offset_loss": losses.masked_l1(y_true["offset"], y_pred["offset"], y_true["mask"])}

    def loss(y_true, y_pred):
        p = parts(y_true, y_pred)
        return p["heatmap_loss"] + config.size_weight * p["size_loss"] + config.offset_weight * p["offset_loss"]

    def batch_metrics(y_true, y_pred):
        """Loss parts, and per tile the decoded detections and the truth boxes, for mAP over the whole set."""
        found = detector.decode_detections(y_pred, score_threshold=MAP_SCORE_THRESHOLD,
                                           max_detections=MAP_MAX_DETECTIONS)
        truth = detector.target_boxes(y_true)
        out = parts(y_true, y_pred)
        out.update({f"det_{k}{LIST_SUFFIX}": v for k, v in found.items()})
        out.update({f"gt_{k}{LIST_SUFFIX}": v for k, v in truth.items()})
        return out

    def derive(r):
        if f"det_boxes{LIST_SUFFIX}" not in r:
            return {}
        return detection_scores({k[:-len(LIST_SUFFIX)]: v for k, v in r.items() if k.endswith(LIST_SUFFIX)},
                                config.num_classes)

    return {"targets": TargetSpec(shapes, {k: "float32" for k in shapes}, from_truth), "loss": loss,
            "metrics": batch_metrics, "derive": derive}


#: Detections kept per tile for mAP: a low score floor and a generous cap, so the precision-recall curve is complete.
MAP_SCORE_THRESHOLD = 0.05
MAP_MAX_DETECTIONS = 100


def detection_scores(arrays: Mapping[str, np.ndarray], num_classes: int) -> dict[str, float]:
    """VOC mAP@0.5 per class (``ap50_<class>``, ``map50``) and class-agnostic ``cell_ap50`` from per-tile arrays
    ``det_boxes/scores/classes/valid`` (decode_detections) and ``gt_boxes/classes/valid`` (target_boxes)."""
    names = detector.CLASSES if num_classes == 2 else classifier.STAGES
    detections, truths = [], []
    for i in range(len(arrays["det_boxes"])):
        keep, real = arrays["det_valid"][i].astype(bool), arrays["gt_valid"][i].astype(bool)
        detections.append({"boxes": arrays["det_boxes"][i][keep], "scores": arrays["det_scores"][i][keep],
                           "classes": arrays["det_classes"][i][keep]})
        truths.append({"boxes": arrays["gt_boxes"][i][real], "classes": arrays["gt_classes"][i][real]})
    per_class = metrics.mean_average_precision(detections, truths, num_classes, iou_threshold=0.5)
    out = {f"ap50_{names[c]}": per_class[f"ap_{c}"] for c in range(num_classes)}
    out["map50"] = per_class["map"]
    agnostic = metrics.mean_average_precision([{**d, "classes": np.zeros_like(d["classes"])} for d in detections],
                                              [{**t, "classes": np.zeros_like(t["classes"])} for t in truths], 1)
    out["cell_ap50"] = agnostic["map"]
    return out


def _classifier_spec(config: classifier.ClassifierConfig, patch: int) -> dict[str, Any]:
    if len(config.class_weights) != len(classifier.STAGES):
        raise ConfigError(f"classifier class_weights needs {len(classifier.STAGES)} values "
                          f"({', '.join(classifier.STAGES)}), got {list(config.class_weights)}")

    def from_truth(truth):
        from cellavie_hpc.models.targets import classifier_target
        return {"label": classifier_target(_truth(truth, "instance", "classifier"), _truth(truth, "cls", "classifier"))}

    def loss(y_true, y_pred):
        return losses.softmax_focal_loss(y_true["label"], y_pred["logits"], gamma=config.focal_gamma,
                                         class_weights=config.class_weights)

    def batch_metrics(y_true, y_pred):
        labels = ops.cast(ops.reshape(y_true["label"], (-1,)), "int32")
        predicted = ops.cast(ops.argmax(y_pred["logits"], axis=-1), "int32")  # stage accuracy
        tp, fp, tn, fn = metrics.infection_counts(labels, metrics.infected_calls(y_pred["logits"]))
        correct = ops.sum(ops.cast(ops.equal(labels, predicted), "float32"))
        n = ops.cast(ops.size(labels), "float32")
        return {"accuracy": correct / n, "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                "precision": tp / (tp + fp), "tp_total": tp, "fp_total": fp, "tn_total": tn, "fn_total": fn,
                "correct_total": correct, "sample_total": n}

    def derive(r):
        out = metrics.infection_rates(r["tp_total"], r["fp_total"], r["tn_total"], r["fn_total"])
        out["accuracy"] = r["correct_total"] / r["sample_total"] if r["sample_total"] else float("nan")
        return out

    return {"targets": TargetSpec({"label": ()}, {"label": "int32"}, from_truth), "loss": loss,
            "metrics": batch_metrics, "derive": derive}


_SPECS = {"refocus": _refocus_spec, "unet": _unet_spec, "detector": _detector_spec, "classifier": _classifier_spec}
