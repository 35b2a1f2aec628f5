"""Batch scripts: the golden rendering of a point, hostile values refused, hostile paths quoted."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cellavie_hpc.config import from_mapping
from cellavie_hpc.errors import ConfigError
from cellavie_hpc.launch.render import check_script, render_point
from cellavie_hpc.launch.slurm_options import SlurmOptions
from cellavie_hpc.launch.sweep import SweepSpec, plan

HERE = Path(__file__).parent
JOBS = HERE.parents[1] / "jobs"
GOLDEN = HERE / "golden" / "horovod_point.sbatch"

SWEEP = {
    "name": "golden",
    "dataset": {"generate": {"images": 4, "size": 256}},
    "base": {"model": {"name": "unet", "preset": "tiny"}, "data": {"patch": 64}, "train": {"steps": 5}},
    "grid": {"backend": ["horovod", "multiworker"], "gpus_per_node": 2, "nodes": 2},
    "cluster": {"partition": "gpu", "account": "proj-42", "qos": "normal", "constraint": "a100&ib",
                "time_min": 45, "modules": ["cuda/12.2", "openmpi/4.1.5"], "setup": ["export NCCL_DEBUG=WARN"],
                "cpus_per_task": 8, "mem_gb": 64, "signal_delay_s": 120},
}


def spec_with(**cluster) -> SweepSpec:
    return from_mapping(SweepSpec, {**SWEEP, "cluster": {**SWEEP["cluster"], **cluster}}, "golden.yaml")


def render(spec: SweepSpec, index: int = 0, sweep_dir: str = "/scratch/sweeps/golden", python: str = "/opt/venv/bin/python"):
    p = plan(spec, f"{sweep_dir}/dataset", "golden.yaml")
    return render_point(spec, p.points[index], sweep_dir, python)


def test_golden_horovod_point():
    text = render(spec_with())
    if os.environ.get("CELLAVIE_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text(), "rendering changed; rerun with CELLAVIE_UPDATE_GOLDEN=1 and review the diff"
    check_script(text)
    assert "srun --kill-on-bad-exit=1 --mpi=pmix --gpus-per-task=1 /opt/venv/bin/python -m cellavie_hpc train" in text


def test_multiworker_point_gets_a_job_dependent_port_base(tmp_path):
    text = render(spec_with(), index=1)
    check_script(text)
    line = next(ln for ln in text.splitlines() if ln.startswith("srun"))
    assert "--mpi" not in line and "train.port_base=$(( 20000 + SLURM_JOB_ID % 2000 * 16 ))" in line
    # what bash makes of it for job 123457: 20000 + 1457 * 16
    expr = re.search(r"\$\(\(.*?\)\)", line).group(0)
    out = subprocess.run(["bash", "-c", f"SLURM_JOB_ID=123457; echo {expr}"], capture_output=True, text=True)
    assert out.stdout.strip() == str(20000 + 1457 * 16)


@pytest.mark.parametrize("key, value", [
    ("partition", "debug; rm -rf ~"),
    ("partition", "debug\n#SBATCH --uid=0"),
    ("account", "a'b"),
    ("qos", "$(reboot)"),
    ("constraint", "a100 && touch /tmp/x"),
    ("modules", ["cuda/12.2; rm -rf ~"]),
    ("modules", ["cuda\nrm"]),
    ("setup", ["echo ok\nrm -rf ~"]),
])
def test_hostile_cluster_values_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        render(spec_with(**{key: value}))
    assert key in str(err.value) and "refused" in str(err.value)


def test_hostile_job_name_is_refused():
    with pytest.raises(ConfigError, match="job_name"):
        SlurmOptions(job_name="x`id`", time_min=5)


@pytest.mark.parametrize("sweep_dir", ["/scratch/my sweeps/it's \"quoted\"", "/tmp/a;b/$(touch x)/`id`"])
def test_hostile_but_legitimate_paths_are_quoted(sweep_dir, tmp_path):
    text = render(spec_with(), sweep_dir=sweep_dir, python="/opt/my env/bin/python")
    check_script(text)
    srun = next(ln for ln in text.splitlines() if ln.startswith("srun"))
    argv = shlex.split(srun)
    assert argv[argv.index("--run-dir") + 1] == f"{sweep_dir}/runs/p000-horovod-unet-2x2-r0"
    assert f"{sweep_dir}/configs/p000-horovod-unet-2x2-r0.yaml" in argv and "/opt/my env/bin/python" in argv
    output = next(ln for ln in text.splitlines() if ln.startswith("#SBATCH --output="))
    assert shlex.split(output[len("#SBATCH "):])[0] == f"--output={sweep_dir}/scripts/logs/p000-horovod-unet-2x2-r0-%j.out"
    # running the script's commands with no-op srun/scontrol/module leaves no stray file
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool in ("srun", "scontrol", "module"):
        (fake / tool).write_text("#!/bin/sh\nexit 0\n")
        (fake / tool).chmod(0o755)
    script = tmp_path / "job.sh"
    script.write_text(text.replace("if [[ ! -f", "if [[ -z skip-generation && ! -f"))
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_JOB_ID": "7"})
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "job.sh"]


def test_check_script_refuses_what_sbatch_would_misread():
    good = "#!/bin/bash\n#SBATCH --time=5\necho hi\n"
    check_script(good)
    for bad, why in [
        ("#!/bin/bash\n#SBATCH --time=5 --uid=0\necho\n", "not one known sbatch flag"),
        ("#!/bin/bash\n#SBATCH --time='5\necho\n", "does not parse"),
        ("#!/bin/bash\necho hi\n#SBATCH --time=5\n", "after the first command"),
        ("#!/bin/bash\n#SBATCH --uid=0\n", "not one known sbatch flag"),
        ("#!/bin/bash\nif then fi\n", "bash -n"),
        ("echo no shebang\n", "#!"),
    ]:
        with pytest.raises(ConfigError, match=why):
            check_script(bad)


@pytest.mark.parametrize("name", ["single", "mirrored", "multiworker", "horovod"])
def test_hand_editable_templates_are_valid_and_call_cellavie_train(name):
    text = (JOBS / f"{name}.sbatch").read_text()
    check_script(text, name)
    assert f"train.backend={name}" in text and "cellavie train" in text and "--signal=USR1@" in text
    assert ("--mpi=pmix" in text) == (name == "horovod")


def test_screen_template_is_valid_and_quotes_its_arguments():
    text = (JOBS / "screen.sbatch").read_text()
    check_script(text, "screen")
    assert 'cellavie screen --samples-from "${SAMPLES}" --models "${MODELS}" --out "${OUT}" "$@"' in text


def test_render_cli_writes_script_and_config(tmp_path):
    sweep = tmp_path / "s w.yaml"
    sweep.write_text(yaml.safe_dump(SWEEP))
    out = tmp_path / "out dir"
    script = tmp_path / "p1.sbatch"
    proc = subprocess.run([sys.executable, "-m", "cellavie_hpc", "sweep", "render", str(sweep), "--point", "1", "--out", str(out),
                           "--script", str(script), "--set", "cluster.partition=debug"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    check_script(text)
    assert "#SBATCH --partition=debug" in text
    config = yaml.safe_load((out / "configs" / "p001-multiworker-unet-2x2-r0.yaml").read_text())
    assert config["train"]["backend"] == "multiworker" and config["data"]["dataset"] == str(out / "dataset")
    bad = subprocess.run([sys.executable, "-m", "cellavie_hpc", "sweep", "render", str(sweep), "--point", "1", "--out", str(out),
                          "--set", "cluster.partition=x;rm -rf ~"], capture_output=True, text=True)
    assert bad.returncode == 2 and "cluster.partition" in bad.stderr and "refused" in bad.stderr
