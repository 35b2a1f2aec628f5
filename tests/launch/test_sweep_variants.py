"""Sweep variants: named sets of improvement switches, expanded as a point axis, validated before anything runs."""
from pathlib import Path

import pytest

from cellavie_hpc.errors import ConfigError
from cellavie_hpc.launch.sweep import load_sweep, plan
from cellavie_hpc.train.config import resolve

JOBS = Path(__file__).resolve().parents[2] / "jobs"

BASE = """
name: v
base: {model: {name: unet, preset: tiny}, data: {patch: 64},
       train: {steps: 3, batch_per_replica: 4, horovod: {timeline: true}}}
dataset: {path: /data/set}
variants:
  fp16: {train: {allreduce_compression: fp16}}
  accum4: {train: {batch_per_replica: 2, grad_accum: 4}}
  per_tensor: {train: {horovod: {exchange: per_tensor, cycle_time_ms: 5}}}
  tile_cache: {data: {tile_cache: $TMPDIR/tiles}}
"""


def plan_of(tmp_path, body: str, base: str = BASE):
    path = tmp_path / "sweep.yaml"
    path.write_text(base + body)
    return plan(load_sweep(path), "/data/set", "sweep.yaml")


def test_variants_interleave_repeats_and_apply_over_base_and_axes(tmp_path):
    p = plan_of(tmp_path, "grid: {backend: horovod, gpus_per_node: [1, 2], batch_per_gpu: 8, repeats: 2,\n"
                          "       variant: [baseline, fp16, accum4, per_tensor, tile_cache]}")
    assert len(p.points) == 2 * 2 * 5
    first = [(q.gpus_per_node, q.variant, q.repeat) for q in p.points[:6]]
    assert first == [(1, "baseline", 0), (1, "fp16", 0), (1, "accum4", 0), (1, "per_tensor", 0),
                     (1, "tile_cache", 0), (1, "baseline", 1)]
    assert p.points[1].id == "p001-horovod-unet-1x1-fp16-r0" and len({q.id for q in p.points}) == 20
    cfg = {q.variant: c for q, c in zip(p.points, p.configs) if q.repeat == 1 and q.gpus_per_node == 2}
    assert cfg["baseline"]["train"]["batch_per_replica"] == 8
    assert "allreduce_compression" not in cfg["baseline"]["train"]
    assert cfg["fp16"]["train"]["allreduce_compression"] == "fp16" and cfg["fp16"]["train"]["batch_per_replica"] == 8
    # the variant wins over the point's axis (batch_per_gpu 8) and merges into base's nested sections
    assert (cfg["accum4"]["train"]["batch_per_replica"], cfg["accum4"]["train"]["grad_accum"]) == (2, 4)
    assert cfg["per_tensor"]["train"]["horovod"] == {"timeline": True, "exchange": "per_tensor", "cycle_time_ms": 5}
    assert cfg["tile_cache"]["data"] == {"patch": 64, "dataset": "/data/set", "tile_cache": "$TMPDIR/tiles"}
    # the variant is part of the point, hence of run.point, which the engine copies into every record header
    for variant, c in cfg.items():
        assert c["run"]["point"]["variant"] == variant and c["run"]["seed"] == 1
        config = resolve(c)
        assert config.run.point["variant"] == variant and config.run.point["world_size"] == 2
    assert resolve(cfg["per_tensor"]).train.horovod.environment("/r")["HOROVOD_CYCLE_TIME"] == "5.0"


def test_sweeps_without_variants_keep_their_points(tmp_path):
    p = plan_of(tmp_path, "grid: {backend: horovod, gpus_per_node: [1, 2], repeats: 2}")
    assert [q.id for q in p.points] == ["p000-horovod-unet-1x1-r0", "p001-horovod-unet-1x1-r1",
                                        "p002-horovod-unet-1x2-r0", "p003-horovod-unet-1x2-r1"]
    assert all("variant" not in q.mapping() and "variant" not in c["run"]["point"] for q, c in zip(p.points, p.configs))
    assert all("allreduce_compression" not in c["train"] for c in p.configs)  # defined, unused: no effect


@pytest.mark.parametrize("body, base_edit, fragments", [
    ("grid: {backend: horovod, variant: [baseline, fp61]}", None,
     ["grid: variant 'fp61' is not defined under 'variants:'", "did you mean 'fp16'", "known: baseline, accum4"]),
    ("points: [{backend: horovod, variant: tile-cache}]", None, ["points[0]: variant 'tile-cache'", "'tile_cache'"]),
    ("grid: {backend: horovod, variant: fp16}", ("allreduce_compression: fp16", "allreduce_compresion: fp16"),
     ["variants.fp16: training configuration", "unknown key 'allreduce_compresion'",
      "did you mean 'allreduce_compression'"]),
    ("grid: {backend: horovod, variant: fp16}", ("exchange: per_tensor", "exchnage: per_tensor"),  # unused variant
     ["variants.per_tensor", "unknown key 'exchnage'", "did you mean 'exchange'"]),
    ("grid: {backend: horovod, variant: fp16}", ("allreduce_compression: fp16", "allreduce_compression: fp8"),
     ["variants.fp16", "'fp8' is not one of"]),
    ("grid: {backend: horovod, variant: fp16}", ("fp16: {train:", "fp16: {trian:"),
     ["variants.fp16: unknown section 'trian'", "did you mean 'train'", "run.* belongs to the sweep"]),
    ("grid: {backend: horovod, variant: fp16}", ("fp16: {train:", "fp/16: {train:"), ["variants: name 'fp/16'"]),
    ("grid: {backend: horovod, variant: fp16}", ("fp16: {train: {", "fp16: {train: {backend: mirrored, "),
     ["variants.fp16: sets train.backend, a point axis", "use the grid's 'backend' axis"]),
    ("grid: {backend: horovod, gpus_per_node: 3, variant: [baseline, fp16]}",
     ("fp16: {train: {", "fp16: {train: {global_batch: 8, "),
     ["point 1 (p001-horovod-unet-1x3-fp16-r0), variant 'fp16'", "global_batch=8 is not divisible by the 3"]),
])
def test_variant_mistakes_fail_naming_the_variant(tmp_path, body, base_edit, fragments):
    base = BASE if base_edit is None else BASE.replace(*base_edit)
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, body, base)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_shipped_improvement_study_expands(tmp_path):
    full = plan(load_sweep(JOBS / "improvements.yaml"), "/d", "improvements.yaml")
    assert {q.world_size for q in full.points} == {1, 2, 4, 8, 16}
    by_backend = {b: {q.variant for q in full.points if q.backend == b} for b in ("horovod", "multiworker")}
    assert by_backend["horovod"] == {"baseline", "fp16", "accum4", "per_tensor", "hierarchical", "staging",
                                     "tile_cache"}                      # no bf16: Horovod cannot reduce it
    assert by_backend["multiworker"] == by_backend["horovod"] - {"per_tensor", "hierarchical"} | {"bf16"}
    assert {q.repeat for q in full.points} == {0, 1, 2}
    smoke = plan(load_sweep(JOBS / "improvements.yaml", scale="smoke"), "/d", "improvements.yaml")
    assert max(q.ranks for q in smoke.points) == 2 and smoke.spec.cluster.exclusive
    assert len(smoke.points) == 3 * 2 * (5 + 4)
    accum = next(c for q, c in zip(smoke.points, smoke.configs) if q.variant == "accum4")
    assert accum["model"]["preset"] == "tiny" and (accum["train"]["batch_per_replica"], accum["train"]["grad_accum"]) \
        == (2, 4)
    per_tensor = next(c for q, c in zip(smoke.points, smoke.configs) if q.variant == "per_tensor")
    assert per_tensor["train"]["horovod"] == {"exchange": "per_tensor", "fusion_threshold_bytes": 118784,
                                              "cycle_time_ms": 5}
