"""Rank and world size as each launcher announces them, and rank 0 of 1 outside any launcher."""
import json

from cellavie_hpc.launch.job_env import detect, expand_hostlist, tf_config


def test_outside_any_launcher_is_rank_zero_of_one():
    env = detect({})
    assert (env.rank, env.world_size, env.local_rank, env.nodes, env.launcher) == (0, 1, 0, 1, "none")


def test_slurm_step_gives_ranks_nodes_and_array_ids():
    env = detect({
        "SLURM_JOB_ID": "1234", "SLURM_ARRAY_JOB_ID": "1200", "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2", "SLURM_JOB_NUM_NODES": "4", "SLURMD_NODENAME": "gpu07",
        "SLURM_JOB_NODELIST": "gpu[05-07],cpu1", "SLURM_RESTART_COUNT": "2",
    })
    assert (env.rank, env.world_size, env.local_rank, env.local_size) == (5, 8, 1, 2)
    assert (env.node_rank, env.nodes, env.node, env.launcher) == (2, 4, "gpu07", "slurm")
    assert env.slurm_ids() == {"job_id": "1234", "array_job_id": "1200", "array_task_id": 3, "restart_count": 2}
    assert env.hostnames == ("gpu05", "gpu06", "gpu07", "cpu1")


def test_batch_script_outside_a_step_is_one_process():
    env = detect({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert (env.rank, env.world_size, env.launcher, env.job_id) == (0, 1, "slurm", "9")


def test_mpirun_inside_an_allocation_wins_over_slurm():
    env = detect({
        "SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1",
        "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    })
    assert (env.rank, env.world_size, env.local_rank, env.nodes, env.launcher) == (3, 4, 1, 2, "mpirun")


def test_horovodrun_and_tf_config():
    hvd = detect({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1", "HOROVOD_LOCAL_SIZE": "2"})
    assert (hvd.rank, hvd.world_size, hvd.launcher) == (1, 2, "horovodrun")
    tf = detect({"TF_CONFIG": json.dumps({"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 2}})})
    assert (tf.rank, tf.world_size, tf.launcher, tf.nodes) == (2, 3, "tf_config", 3)
    local = detect({"TF_CONFIG": json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2", "gpu2:1"]},
                                             "task": {"type": "worker", "index": 1}})})
    assert (local.rank, local.local_rank, local.local_size, local.node_rank, local.nodes) == (1, 1, 2, 0, 2)


def test_hostlist_expansion_keeps_zero_padding():
    assert expand_hostlist("n[008-011]") == ["n008", "n009", "n010", "n011"]
    assert expand_hostlist("a,b[1,3-4]c") == ["a", "b1c", "b3c", "b4c"]


def test_tf_config_written_for_a_worker_reads_back_as_its_rank():
    value = tf_config(["a:1", "a:2", "b:1"], 2)
    env = detect({"TF_CONFIG": value})
    assert (env.rank, env.world_size, env.nodes, env.node_rank) == (2, 3, 2, 1)
