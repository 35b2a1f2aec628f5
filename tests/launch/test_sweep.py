"""Sweep files: validation (unknown keys, impossible points) before anything runs, and expansion."""
from pathlib import Path

import pytest
import yaml

from cellavie_hpc.errors import ConfigError
from cellavie_hpc.launch.slurm_options import for_point, shape_of
from cellavie_hpc.launch.sweep import load_sweep, plan

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


BASE = """
name: t
base: {model: {name: unet, preset: tiny}, data: {patch: 64}, train: {steps: 3, batch_per_replica: 4}}
dataset: {path: /data/set}
"""


def points_of(tmp_path, body: str, **kw):
    spec = load_sweep(write(tmp_path, BASE + body), **kw)
    return plan(spec, "/data/set", "sweep.yaml")


def test_grid_is_the_cartesian_product_in_file_order(tmp_path):
    p = points_of(tmp_path, "grid: {backend: [multiworker, horovod], gpus_per_node: [1, 2, 4], repeats: 2}")
    assert len(p.points) == 12
    assert [(q.backend, q.gpus_per_node, q.repeat) for q in p.points[:4]] == [
        ("multiworker", 1, 0), ("multiworker", 1, 1), ("multiworker", 2, 0), ("multiworker", 2, 1)]
    assert [q.index for q in p.points] == list(range(12))
    assert len({q.id for q in p.points}) == 12
    seeds = [c["run"]["seed"] for c in p.configs[:2]]
    assert seeds == [0, 1]  # repeats differ by seed


def test_points_and_grids_combine_and_fill_from_base(tmp_path):
    p = points_of(tmp_path, """
grid: [{study: strong, backend: horovod, gpus_per_node: [1, 2], global_batch: 8},
       {study: weak, backend: horovod, gpus_per_node: 2, batch_per_gpu: 2, images_per_rank: 3}]
points: [{backend: mirrored, gpus_per_node: 2, precision: mixed_bfloat16, xla: true}]
""")
    strong1, strong2, weak, mirrored = p.points
    assert (strong2.world_size, strong2.tasks_per_node, strong2.ranks) == (2, 2, 2)
    assert p.configs[1]["train"]["global_batch"] == 8 and strong1.patch == 64 and strong1.steps == 3
    assert p.configs[2]["data"]["max_images"] == 6 and p.configs[2]["train"]["batch_per_replica"] == 2
    assert (mirrored.tasks_per_node, mirrored.ranks, mirrored.world_size) == (1, 1, 2)
    cfg = p.configs[3]
    assert cfg["train"]["precision"] == "mixed_bfloat16" and cfg["train"]["xla"] is True
    assert cfg["train"]["cpu_replicas"] == 2 and cfg["data"]["dataset"] == "/data/set"
    assert cfg["run"]["point"]["id"] == mirrored.id and cfg["run"]["point"]["world_size"] == 2


@pytest.mark.parametrize("body, key, fragment", [
    ("grid: {backend: mirrored, nodes: 2}", "'nodes'", "one node"),
    ("grid: {backend: single, gpus_per_node: 2}", "'gpus_per_node'", "one device"),
    ("grid: {backend: horovod, gpus_per_node: 3, global_batch: 8}", "'global_batch'", "does not divide over 3"),
    ("grid: {backend: horovod, gpus_per_node: [2, 8]}\ncluster: {node_gpus: 4}", "'gpus_per_node'", "node_gpus declares 4"),
    ("grid: {backend: horovod, gpus_per_node: []}", "grid.gpus_per_node", "empty list"),
    ("grid: {backend: horovod, batch_per_gpu: 4, global_batch: 8}", "'global_batch'", "not both"),
    ("points: []", "no points", ""),
    ("grid: {backend: horovod, gpus_per_nod: 2}", "unknown key 'gpus_per_nod'", "did you mean 'gpus_per_node'"),
    ("grid: {backend: horvod}", "'horvod' is not one of", "did you mean 'horovod'"),
    ("grid: {backend: single}\ncluster: {partiton: debug}", "unknown key 'partiton'", "did you mean 'partition'"),
    ("grid: {backend: single, steps: 0}", "'steps'", "positive"),
])
def test_impossible_sweeps_fail_naming_the_key_and_point(tmp_path, body, key, fragment):
    with pytest.raises(ConfigError) as err:
        points_of(tmp_path, body)
    assert key in str(err.value) and fragment in str(err.value)
    if "->" in str(err.value):
        assert "point" in str(err.value)


def test_world_size_one_is_fine_for_distributed_backends(tmp_path):
    p = points_of(tmp_path, "grid: {backend: [multiworker, horovod], gpus_per_node: 1}")
    assert [q.ranks for q in p.points] == [1, 1]


def test_base_typo_is_caught_by_the_training_configuration(tmp_path):
    with pytest.raises(ConfigError, match=r"point 0 .*training configuration.*unknown key 'bach_size'"):
        load = load_sweep(write(tmp_path, BASE.replace("steps: 3", "steps: 3, bach_size: 4") + "grid: {backend: single}"))
        plan(load, "/data/set", "sweep.yaml")


def test_scale_merges_over_the_file_and_set_overrides(tmp_path):
    spec = load_sweep(JOBS / "scaling.yaml", scale="smoke", overrides=["cluster.time_min=12"])
    p = plan(spec, "/d", "scaling.yaml")
    assert spec.cluster.partition == "debug" and spec.cluster.time_min == 12 and spec.cluster.mem_gb is None
    assert max(q.ranks for q in p.points) == 4 and all(q.nodes == 1 for q in p.points)
    assert all(c["model"]["preset"] == "tiny" and c["train"]["steps"] == 4 for c in p.configs)
    with pytest.raises(ConfigError, match="no scale 'smok'.*did you mean 'smoke'"):
        load_sweep(JOBS / "scaling.yaml", scale="smok")


def test_shipped_sweeps_expand(tmp_path):
    full = plan(load_sweep(JOBS / "scaling.yaml"), "/d", "scaling.yaml")
    assert {q.world_size for q in full.points} == {1, 2, 4, 8, 16}
    assert {q.backend for q in full.points} == {"single", "mirrored", "multiworker", "horovod"}
    single = plan(load_sweep(JOBS / "single_gpu.yaml"), "/d", "single_gpu.yaml")
    assert len(single.points) == 64 and len({shape_of(q) for q in single.points}) == 1
    smoke = plan(load_sweep(JOBS / "smoke.yaml"), "/d", "smoke.yaml")
    assert [(q.backend, q.ranks) for q in smoke.points] == [("single", 1), ("horovod", 2), ("multiworker", 2)]


def test_points_of_one_shape_share_one_request(tmp_path):
    p = points_of(tmp_path, "grid: {backend: horovod, gpus_per_node: 2, batch_per_gpu: [2, 4]}\n"
                            "cluster: {partition: gpu, gpus: gres, mem_gb: 1.5}")
    a, b = (for_point(p.spec.cluster, q, "t") for q in p.points)
    assert a == b
    assert ("gres", "gpu:2") in a.sbatch_options() and ("mem", "1536M") in a.sbatch_options()
    assert a.srun_args() == ["--mpi=pmix", "--gpus-per-task=1"]
    params = a.submitit_parameters(8)
    assert params["gres"] == "gpu:2" and params["ntasks_per_node"] == 2 and params["srun_args"] == a.srun_args()


def test_fingerprint_changes_with_the_points(tmp_path):
    a = points_of(tmp_path, "grid: {backend: horovod, gpus_per_node: [1, 2]}")
    b = points_of(tmp_path, "grid: {backend: horovod, gpus_per_node: [1, 4]}")
    assert a.fingerprint != b.fingerprint
    assert yaml.safe_load(yaml.safe_dump(a.configs[0])) == a.configs[0]
