"""Plain batch scripts: the exact Slurm request and `srun ... cellavie train` of one sweep point.

`cellavie sweep submit` goes through submitit (arrays, requeue protocol); the script rendered here is
its hand-runnable equivalent (`sbatch scripts/<point>.sbatch`) with the same request, command, run
directory and preemption behaviour: Slurm sends SIGUSR1 to the ranks `signal_delay_s` before the time
limit, they checkpoint and exit with `PREEMPTED_EXIT`, and the script requeues the job, which resumes.
Rendering is a pure function of its arguments; every value is validated upstream (`slurm_options`)
and quoted here with `shlex.quote`. `check_script` refuses a script that bash cannot parse or whose
`#SBATCH` lines sbatch would misread.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Sequence

from cellavie_hpc.errors import ConfigError
from cellavie_hpc.launch import state
from cellavie_hpc.launch.slurm_options import for_point, python_command
from cellavie_hpc.launch.sweep import Point, SweepSpec
from cellavie_hpc.launch.task import PORT_FLOOR, PORT_JOBS, PORTS_PER_JOB, train_argv
from cellavie_hpc.train.signals import PREEMPTED_EXIT

#: Flags a rendered (or submitit-generated) script may carry; anything else is a bug or an injection.
SBATCH_FLAGS = frozenset({
    "job-name", "partition", "account", "qos", "constraint", "time", "nodes", "ntasks-per-node",
    "cpus-per-task", "gpus-per-node", "gpus-per-task", "gres", "mem", "exclusive", "signal", "requeue",
    "open-mode", "output", "error", "array", "dependency", "wckey", "comment",
    # flags people add when they edit a template by hand
    "ntasks", "ntasks-per-gpu", "gpus", "cpus-per-gpu", "mem-per-cpu", "mem-per-gpu", "chdir", "mail-type",
    "mail-user", "reservation", "licenses", "nice", "hint", "distribution", "export", "begin", "deadline",
})
_SBATCH_TOKEN = re.compile(r"--([a-z][a-z-]*)(=(.+))?", re.S)


def _q(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


def render_point(spec: SweepSpec, point: Point, sweep_dir: str, python: str) -> str:
    """The batch script of `point` for a sweep directory `sweep_dir` (absolute) and interpreter `python`."""
    options = for_point(spec.cluster, point, spec.name)
    py = python_command(spec.cluster, python)
    run_dir = str(state.run_dir_of(sweep_dir, point.id))
    # Multiworker: the same port base as a submitted task (from the job id), so jobs sharing a node differ.
    port = ["train.port_base=@PORT@"] if point.backend == "multiworker" else []
    train = _q(train_argv(py, str(state.config_path(sweep_dir, point.id)), run_dir, port))
    train = train.replace("@PORT@", f"$(( {PORT_FLOOR} + SLURM_JOB_ID % {PORT_JOBS} * {PORTS_PER_JOB} ))")
    log = str(Path(state.script_path(sweep_dir, point.id)).parent / "logs" / f"{point.id}-%j.out")
    lines = [
        "#!/bin/bash",
        f"# cellavie-hpc sweep '{spec.name}', point {point.index}: {point.id}",
        f"# {point.backend}, {point.nodes} node(s) x {point.tasks_per_node} task(s), "
        f"{point.gpus_per_node} GPU(s) per node. Submit by hand with: sbatch <this file>",
        "# Records go to the run directory below; a requeued job resumes from its checkpoints.",
        *options.sbatch_lines([
            ("signal", f"USR1@{spec.cluster.signal_delay_s}"), ("requeue", None), ("open-mode", "append"),
            ("output", log),
        ]),
        "",
        "set -uo pipefail",
        *options.setup_lines(),
    ]
    generate = spec.dataset.generate if spec.dataset else None
    if generate is not None:
        dataset = str(state.dataset_dir(sweep_dir))
        gen = [*py, "-m", "cellavie_hpc", "generate", "--out", dataset, "--images", str(generate.images),
               "--size", str(generate.size), "--parasitemia", repr(generate.parasitemia), "--seed", str(generate.seed),
               "--angles", str(generate.angles), "--no-progress"]
        lines += ["", "# The sweep's synthetic data set, generated once.",
                  f"if [[ ! -f {shlex.quote(dataset + '/manifest.json')} ]]; then",
                  f"    {_q(gen)} || exit 1", "fi"]
    lines += [
        "",
        f"# Ranks: {point.ranks} task(s) under srun; each finds its rank and world size in the Slurm variables.",
        f"srun --kill-on-bad-exit=1 {_q(options.srun_args()) + ' ' if options.srun_args() else ''}{train}",
        "status=$?",
        f"# Exit status {PREEMPTED_EXIT}: the ranks checkpointed on SIGUSR1 (time limit near); run the rest later.",
        f"if [[ ${{status}} -eq {PREEMPTED_EXIT} ]]; then",
        '    scontrol requeue "${SLURM_JOB_ID}"',
        "fi",
        'exit "${status}"',
        "",
    ]
    return "\n".join(lines)


def check_script(text: str, where: str = "script") -> None:
    """Refuse a batch script that bash cannot parse or whose `#SBATCH` lines are not single valid flags.

    sbatch reads `#SBATCH` lines only before the first command, so one after it would be silently
    ignored: that is refused too.
    """
    lines = text.split("\n")
    if not lines or not lines[0].startswith("#!"):
        raise ConfigError(f"{where}: the first line must be a #! interpreter line")
    commands_started = False
    for n, line in enumerate(lines[1:], start=2):
        stripped = line.strip()
        if line.startswith("#SBATCH"):
            if commands_started:
                raise ConfigError(f"{where}:{n}: #SBATCH after the first command is ignored by sbatch: {line!r}")
            try:
                tokens = shlex.split(line[len("#SBATCH"):])
            except ValueError as err:
                raise ConfigError(f"{where}:{n}: #SBATCH line does not parse ({err}): {line!r}") from err
            match = _SBATCH_TOKEN.fullmatch(tokens[0]) if len(tokens) == 1 else None
            if match is None or match.group(1) not in SBATCH_FLAGS:
                raise ConfigError(f"{where}:{n}: not one known sbatch flag: {line!r}")
            if match.group(3) is not None and any(c in match.group(3) for c in "\n\r\x00"):
                raise ConfigError(f"{where}:{n}: value with a line break: {line!r}")
        elif stripped and not stripped.startswith("#"):
            commands_started = True
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"{where}: bash -n refuses the script: {proc.stderr.strip()}")
