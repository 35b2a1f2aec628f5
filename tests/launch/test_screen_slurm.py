"""jobs/screen.sbatch on the real one-node Slurm: an array over two samples, two ranks per sample.

Each array task screens the sample on its line of the list; its two ranks (srun, PMIx) split the
sample's images, and the last to finish writes the summary. The result must equal a one-process
screen of the same sample, and `cellavie collect` must read every rank's records.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def screened(slurm_cluster, tmp_path_factory):
    import keras

    from cellavie_hpc.data.synthetic import generate_dataset
    from cellavie_hpc.models.registry import build_model
    from cellavie_hpc.screen.models_dir import ChainSpec, NetworkEntry, save_chain

    root = tmp_path_factory.mktemp("screen-slurm")
    samples = []
    for k in range(2):
        samples.append(root / f"sample-{k}")
        generate_dataset(samples[-1], images=3, size=256, parasitemia=0.05, seed=40 + k, workers=1, progress=False,
                         defocus_m=(10e-6, 20e-6))
    listing = root / "samples.txt"
    listing.write_text("# two samples\n" + "".join(f"{s}\n" for s in samples))
    keras.utils.set_random_seed(0)
    models = root / "models"
    save_chain(models, ChainSpec(classifier=NetworkEntry(name="classifier", file="classifier.keras", patch=64)),
               {"classifier": build_model("classifier", "tiny", 64, 1)})
    out = root / "out"
    # the job runs `cellavie` from PATH, as on a cluster where the site's environment is activated
    env = {**slurm_cluster.env, "PATH": f"{Path(sys.executable).parent}:{slurm_cluster.env.get('PATH', '')}"}
    proc = slurm_cluster.run(
        ["sbatch", "--parsable", f"--partition={slurm_cluster.partition}", "--array=0-1", "--ntasks=2",
         "--cpus-per-task=1", "--time=10", f"--output={root}/slurm-%A_%a.out", "--chdir", str(root),
         str(REPO / "jobs" / "screen.sbatch"), str(listing), str(models), str(out),
         "--tile", "128", "--overlap", "64", "--overlays", "none", "--quiet"],
        env=env, timeout=60)
    array_id = proc.stdout.strip().split(";")[0]
    states = [slurm_cluster.wait_job(f"{array_id}_{k}", timeout=300) for k in range(2)]
    logs = "\n".join(p.read_text() for p in root.glob("slurm-*.out"))
    assert states == ["COMPLETED", "COMPLETED"], logs[-3000:]
    return {"root": root, "samples": samples, "models": models, "out": out, "array_id": array_id}


def test_each_array_task_screens_its_sample_with_two_ranks(screened):
    from cellavie_hpc.screen.chain import ScreenOptions
    from cellavie_hpc.screen.run import screen_sample

    for k, sample in enumerate(screened["samples"]):
        out = screened["out"] / sample.name
        summary = json.loads((out / "summary.json").read_text())
        assert summary["images"] == 3 and summary["throughput"]["ranks"] == 2
        parts = [json.loads((out / "parts" / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
        assert sorted(parts[0]["images"] + parts[1]["images"]) == [0, 1, 2] and min(len(p["images"]) for p in parts) == 1
        for rank in (0, 1):
            lines = (out / "records" / f"rank-{rank:05d}.jsonl").read_text().splitlines()
            header, final = json.loads(lines[0]), json.loads(lines[-1])
            assert (header["rank"], header["world_size"], final["status"]) == (rank, 2, "completed")
            assert header["slurm"]["array_task_id"] == k and str(header["slurm"]["array_job_id"]) == screened["array_id"]
        alone = screen_sample(sample, screened["models"], screened["root"] / f"alone-{k}",
                              ScreenOptions(tile=128, overlap=64), overlays="none", progress=None)
        assert alone["cells_screened"] == summary["cells_screened"] > 50
        a = pd.read_parquet(screened["root"] / f"alone-{k}" / "cells.parquet")
        b = pd.read_parquet(out / "cells.parquet")
        pd.testing.assert_frame_equal(a[["image", "cy", "cx"]], b[["image", "cy", "cx"]])
        assert (a["p_infected"] - b["p_infected"]).abs().max() < 1e-4


def test_collect_reads_every_rank_of_every_task(screened, tmp_path):
    results = tmp_path / "results"
    subprocess.run([sys.executable, "-m", "cellavie_hpc", "collect", str(screened["out"]), "--out", str(results),
                    "--quiet"], check=True, capture_output=True, text=True, timeout=300)
    ranks = pd.read_parquet(results / "ranks.parquet")
    assert len(ranks) == 4 and sorted(ranks["rank"].tolist()) == [0, 0, 1, 1]
    runs = pd.read_parquet(results / "runs.parquet")
    assert len(runs) == 2
