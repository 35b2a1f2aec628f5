"""Submit a sweep: Slurm array jobs through submitit (one array per resource shape), or local processes.

On Slurm, `submit_sweep` returns as soon as the arrays are queued; a small job depending on all of
them (`--dependency=afterany:...`) stores the point statuses and runs `cellavie collect` and
`cellavie report`, so the report appears when the sweep ends, failed points included. Locally
(`--cluster local`, or no `sbatch` on PATH) the same tasks run through submitit's LocalExecutor,
`local_parallelism` points at a time, and the collection runs when they are done.

Submitting again to the same directory (or `--resume SWEEP_DIR`) submits only the points that are
neither done nor still queued/running; each keeps its run directory, so training resumes there.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

import submitit
import yaml

from cellavie_hpc.config import from_mapping, load_yaml
from cellavie_hpc.errors import ConfigError, UserError
from cellavie_hpc.launch import state as st
from cellavie_hpc.launch.render import check_script, render_point
from cellavie_hpc.launch.slurm_options import SlurmOptions, for_point, python_command, shape_of
from cellavie_hpc.launch.sweep import Plan, Point, SweepSpec, plan, sweep_mapping
from cellavie_hpc.launch.task import TrainTask, collect_and_report
from cellavie_hpc.progress import Progress

CLUSTERS = ("slurm", "local", "auto")
COLLECT_TIME_MIN = 30


@dataclass
class SubmitResult:
    sweep_dir: Path
    cluster: str
    submitted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    collect_job: str | None = None
    report: Path | None = None


def resolve_cluster(cluster: str) -> str:
    """`auto`: Slurm when `sbatch` is on PATH, else local processes (the embedded default)."""
    if cluster not in CLUSTERS:
        raise UserError(f"--cluster {cluster!r}: expected one of {', '.join(CLUSTERS)}")
    if cluster == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if cluster == "slurm" and not shutil.which("sbatch"):
        raise UserError("--cluster slurm: sbatch is not on PATH (use --cluster local to run here)")
    return cluster


def _dataset(spec: SweepSpec, sweep_dir: Path, where: str) -> str | None:
    """The data-set path every point trains on (absolute), or None to keep base.data.dataset."""
    if spec.dataset is None:
        if not (spec.base.get("data") or {}).get("dataset"):
            raise ConfigError(f"{where}: no data set: give dataset.path, dataset.generate or base.data.dataset")
        return str(Path(spec.base["data"]["dataset"]).expanduser().resolve())
    if spec.dataset.generate is not None:
        return str(st.dataset_dir(sweep_dir).resolve())
    path = Path(spec.dataset.path).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{where}: dataset.path: {path} is not a folder (give an existing data set)")
    return str(path)


def _check_local(points: Iterable[Point], where: str) -> None:
    for p in points:
        if p.nodes > 1:
            raise ConfigError(f"{where}: point {p.index} ({p.id}): 'nodes': {p.nodes} nodes cannot run on the "
                              "local executor (one node); submit to Slurm or use nodes: 1")
        if p.backend == "horovod" and p.ranks > 1 and not shutil.which("mpirun"):
            raise ConfigError(f"{where}: point {p.index} ({p.id}): horovod with {p.ranks} ranks needs mpirun "
                              "locally (apt-get install openmpi-bin)")


def _entries(the_plan: Plan, sweep_dir: Path, python: list[str]) -> list[st.PointEntry]:
    return [
        st.PointEntry(
            index=p.index, id=p.id, point=p.mapping(), run_dir=str(Path("runs") / p.id),
            config=str(Path("configs") / f"{p.id}.yaml"),
            command=[*python, "-m", "cellavie_hpc", "train", str(st.config_path(sweep_dir, p.id)),
                     "--run-dir", str(st.run_dir_of(sweep_dir, p.id))],
            ranks=p.ranks, shape="n{}t{}g{}-{}min{}".format(*shape_of(p)[:4], "-mpi" if shape_of(p)[4] else ""),
        )
        for p in the_plan.points
    ]


def _load(sweep: str | Path | None, out: str | Path | None, resume: str | Path | None, scale: str | None,
          overrides: Iterable[str]) -> tuple[dict[str, Any], SweepSpec, Path, str]:
    if resume is not None:
        sweep_dir = Path(resume).resolve()
        where = str(sweep_dir / st.SWEEP_YAML)
        mapping = load_yaml(where)
    else:
        if sweep is None:
            raise UserError("give a sweep file, or --resume SWEEP_DIR")
        where = str(sweep)
        mapping = sweep_mapping(sweep, scale, overrides)
    spec = from_mapping(SweepSpec, mapping, where)
    if resume is None:
        sweep_dir = Path(out or Path("sweeps") / spec.name).resolve()
    return mapping, spec, sweep_dir, where


def submit_sweep(sweep: str | Path | None = None, *, out: str | Path | None = None, resume: str | Path | None = None,
                 cluster: str | None = None, dry_run: bool = False, scale: str | None = None,
                 overrides: Iterable[str] = (), stream: TextIO | None = None) -> SubmitResult:
    """Validate, expand and submit a sweep (see the module docstring); `dry_run` prints the plan only."""
    stream = stream or sys.stdout
    mapping, spec, sweep_dir, where = _load(sweep, out, resume, scale, overrides)
    previous = st.load_state(sweep_dir) if (sweep_dir / st.SWEEP_JSON).exists() else None
    kind = resolve_cluster(cluster or (previous.cluster if previous and resume else "auto"))
    the_plan = plan(spec, _dataset(spec, sweep_dir, where), where)
    if kind == "local":
        _check_local(the_plan.points, where)
    for p in the_plan.points:  # every value that reaches a script, checked before anything is printed or written
        for_point(spec.cluster, p, spec.name)
    python = python_command(spec.cluster, sys.executable)
    if previous is not None and previous.fingerprint != the_plan.fingerprint:
        raise UserError(f"{sweep_dir} holds another sweep ('{previous.name}', different points); "
                        "choose another --out, or --resume it with its own sweep.yaml")
    state = previous or st.SweepState(name=spec.name, fingerprint=the_plan.fingerprint, cluster=kind,
                                      dataset=the_plan.configs[0]["data"].get("dataset"),
                                      points=_entries(the_plan, sweep_dir, python))
    statuses = {s.id: s for s in st.point_statuses(sweep_dir, state)} if previous else {}
    todo = [p for p in the_plan.points if p.id not in statuses or statuses[p.id].status in ("unsubmitted", "failed")]
    result = SubmitResult(sweep_dir=sweep_dir, cluster=kind, submitted=[p.id for p in todo],
                          skipped={i: s.status for i, s in statuses.items() if i not in {p.id for p in todo}})
    groups: "OrderedDict[tuple, list[Point]]" = OrderedDict()
    for p in todo:
        groups.setdefault(shape_of(p), []).append(p)
    _print_plan(spec, the_plan, groups, result, kind, stream)
    if dry_run or not todo:
        print("nothing submitted (--dry-run)" if dry_run else "nothing to submit: every point is done or queued",
              file=stream)
        return result
    _prepare(mapping, spec, the_plan, sweep_dir, python)
    state.cluster = kind
    st.save_state(state, sweep_dir)
    if kind == "slurm":
        _submit_slurm(spec, state, groups, sweep_dir, python, result, stream)
    else:
        _run_local(spec, state, todo, sweep_dir, result, stream)
    return result


def _print_plan(spec: SweepSpec, the_plan: Plan, groups: "OrderedDict[tuple, list[Point]]", result: SubmitResult,
                kind: str, stream: TextIO) -> None:
    print(f"sweep '{spec.name}': {len(the_plan.points)} points, {len(result.submitted)} to submit "
          f"({kind}) -> {result.sweep_dir}", file=stream)
    for pid, status in result.skipped.items():
        print(f"  skip {pid} ({status})", file=stream)
    for n, (shape, points) in enumerate(groups.items(), start=1):
        options = for_point(spec.cluster, points[0], spec.name)
        what = "array of" if kind == "slurm" and len(points) > 1 else "job of"
        print(f"{what} {len(points)} point(s): nodes={shape[0]} tasks/node={shape[1]} gpus/node={shape[2]} "
              f"time={shape[3]} min", file=stream)
        if kind == "slurm":
            for line in options.sbatch_lines():
                print(f"    {line}", file=stream)
            print(f"    {' '.join(['srun', *options.srun_args()])} ... cellavie train", file=stream)
        for p in points:
            axes = {"world": p.world_size, "batch/gpu": p.batch_per_gpu, "global_batch": p.global_batch,
                    "patch": p.patch, "images": p.dataset_images, "precision": p.precision, "xla": p.xla,
                    "steps": p.steps, "epochs": p.epochs}
            print(f"  {p.id}: " + " ".join(f"{k}={v}" for k, v in axes.items() if v is not None), file=stream)
    target = "a job depending on every array (afterany)" if kind == "slurm" else "when the points are done"
    print(f"collect + report: {target} -> {result.sweep_dir / 'results'}, {result.sweep_dir / 'report'}", file=stream)


def _prepare(mapping: dict[str, Any], spec: SweepSpec, the_plan: Plan, sweep_dir: Path, python: list[str]) -> None:
    """Write sweep.yaml, the data set (once), every point's configuration and hand-runnable script."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / st.SWEEP_YAML).write_text(yaml.safe_dump(mapping, sort_keys=False))
    generate = spec.dataset.generate if spec.dataset else None
    data_dir = st.dataset_dir(sweep_dir)
    if generate is not None and not (data_dir / "manifest.json").exists():
        from cellavie_hpc.data.synthetic import generate_dataset

        shutil.rmtree(data_dir, ignore_errors=True)  # an interrupted generation (no manifest) starts over
        generate_dataset(data_dir, images=generate.images, size=generate.size, parasitemia=generate.parasitemia,
                         seed=generate.seed, angles=generate.angles)
    (sweep_dir / "scripts" / "logs").mkdir(parents=True, exist_ok=True)
    for point, config in zip(the_plan.points, the_plan.configs):
        path = st.config_path(sweep_dir, point.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        script = render_point(spec, point, str(sweep_dir), sys.executable)
        check_script(script, str(st.script_path(sweep_dir, point.id)))
        st.script_path(sweep_dir, point.id).write_text(script)


def _task(p: Point, sweep_dir: Path, kind: str, spec: SweepSpec) -> TrainTask:
    return TrainTask(p.id, str(st.config_path(sweep_dir, p.id)), str(st.run_dir_of(sweep_dir, p.id)), p.backend,
                     p.ranks, kind, grace_s=max(5, spec.cluster.signal_delay_s - 20))


def _submit_slurm(spec: SweepSpec, state: st.SweepState, groups: "OrderedDict[tuple, list[Point]]", sweep_dir: Path,
                  python: list[str], result: SubmitResult, stream: TextIO) -> None:
    folder = sweep_dir / st.SUBMITIT_DIR
    python_str = " ".join(shlex.quote(p) for p in python)
    array_ids = _still_active_arrays(sweep_dir, state)
    for points in groups.values():
        options = for_point(spec.cluster, points[0], spec.name)
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=spec.cluster.max_requeue, python=python_str)
        executor.update_parameters(**options.submitit_parameters(spec.cluster.array_parallelism))
        jobs = executor.submit_array([_task(p, sweep_dir, "slurm", spec) for p in points])
        for p, job in zip(points, jobs):
            main, _, index = job.job_id.partition("_")
            state.entry(p.id).submissions.append(st.Submission(
                cluster="slurm", job_id=job.job_id, array_job_id=main if index else None,
                array_index=int(index) if index else None))
            array_ids.add(main)
        st.save_state(state, sweep_dir)
        print(f"queued {len(points)} point(s) as job {jobs[0].job_id.partition('_')[0]} ({options.job_name})",
              file=stream)
    _cancel_pending_collect(state)
    cluster = spec.cluster
    depends = sorted(array_ids, key=int)
    options = SlurmOptions(job_name=f"{spec.name}-collect", time_min=COLLECT_TIME_MIN, cpus_per_task=1,
                           partition=cluster.partition, account=cluster.account, qos=cluster.qos,
                           modules=cluster.modules, setup=cluster.setup, signal_delay_s=cluster.signal_delay_s)
    collect = submitit.SlurmExecutor(folder=folder, python=python_str)
    collect.update_parameters(**options.submitit_parameters(1), dependency="afterany:" + ":".join(depends))
    job = collect.submit(collect_and_report, str(sweep_dir), python)
    state.collect_jobs.append({"job_id": job.job_id, "depends_on": depends, "submitted_unix": time.time()})
    st.save_state(state, sweep_dir)
    result.collect_job = job.job_id
    result.report = sweep_dir / "report"
    print(f"queued collect + report as job {job.job_id} (afterany:{':'.join(depends)}); "
          f"follow with: cellavie sweep status {shlex.quote(str(sweep_dir))}", file=stream)


def _still_active_arrays(sweep_dir: Path, state: st.SweepState) -> set[str]:
    """Arrays of earlier submissions with points still pending or running: the new collection waits for them."""
    active = {s.id for s in st.point_statuses(sweep_dir, state) if s.status in ("pending", "running")}
    return {e.submissions[-1].scheduler_id for e in state.points
            if e.id in active and e.submissions and e.submissions[-1].cluster == "slurm"}


def _cancel_pending_collect(state: st.SweepState) -> None:
    """An earlier collection still waiting would report a partial sweep: the new one replaces it."""
    waiting = st.squeue_states(j["job_id"] for j in state.collect_jobs) or {}
    for job_id, job_state in waiting.items():
        if job_state == "PENDING":
            subprocess.run(["scancel", job_id], check=False, capture_output=True)


def _run_local(spec: SweepSpec, state: st.SweepState, todo: list[Point], sweep_dir: Path, result: SubmitResult,
               stream: TextIO) -> None:
    """Run the points through submitit's LocalExecutor (`local_parallelism` at a time), then collect and report."""
    executor = submitit.LocalExecutor(folder=sweep_dir / st.SUBMITIT_DIR)
    queue, active = list(todo), []
    try:
        with Progress(len(todo), f"sweep {spec.name} (local)", unit="points") as bar:
            while queue or active:
                while queue and len(active) < spec.cluster.local_parallelism:
                    p = queue.pop(0)
                    executor.update_parameters(timeout_min=p.time_min, signal_delay_s=spec.cluster.signal_delay_s,
                                               tasks_per_node=p.ranks if p.backend == "multiworker" else 1)
                    job = executor.submit(_task(p, sweep_dir, "local", spec))
                    state.entry(p.id).submissions.append(st.Submission(cluster="local", job_id=job.job_id))
                    st.save_state(state, sweep_dir)
                    active.append((p, job))
                for p, job in [a for a in active if a[1].done()]:
                    active.remove((p, job))
                    progress = st.run_progress(sweep_dir / state.entry(p.id).run_dir, p.ranks)
                    print(f"{p.id}: {'done' if progress.done else 'FAILED'} "
                          f"({progress.completed}/{p.ranks} ranks completed)", file=stream, flush=True)
                    bar.update()
                time.sleep(0.5)
    except KeyboardInterrupt:
        for _, job in active:
            job.cancel(check=False)
        raise
    try:
        paths = collect_and_report(str(sweep_dir))
    except RuntimeError as err:
        raise UserError(f"collect/report of {sweep_dir} failed: {err}") from err
    result.report = Path(paths["report"])


def render_one(sweep: str | Path, point: str, *, out: str | Path | None = None, scale: str | None = None,
               overrides: Iterable[str] = ()) -> tuple[str, list[Path]]:
    """The batch script of one point (checked), and the files it needs written: its configuration and
    the scripts' log folder. The data set, if generated, is generated by the script itself."""
    _, spec, sweep_dir, where = _load(sweep, out, None, scale, overrides)
    the_plan = plan(spec, _dataset(spec, sweep_dir, where), where)
    p = the_plan.point(point)
    script = render_point(spec, p, str(sweep_dir), sys.executable)
    check_script(script, f"point {p.id}")
    config = st.config_path(sweep_dir, p.id)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(the_plan.configs[p.index], sort_keys=False))
    logs = st.script_path(sweep_dir, p.id).parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    return script, [config, logs]


def demo_sweep_file() -> Path:
    """jobs/demo.yaml of this source tree (the demo's sweep)."""
    path = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"
    if not path.exists():
        raise UserError(f"{path} not found: run the demo from a source checkout, or pass --sweep")
    return path


def _without_horovod(entry: dict) -> dict | None:
    """A sweep entry without its horovod back-end (None when nothing else is left)."""
    backend = entry.get("backend")
    if isinstance(backend, list):
        rest = [b for b in backend if b != "horovod"]
        return {**entry, "backend": rest} if rest else None
    return None if backend == "horovod" else entry


def run_demo(out: str | Path, sweep: str | Path | None = None, stream: TextIO | None = None) -> Path:
    """The embedded default end to end, no cluster needed: generate the demo sweep's data set, run its
    points as local processes, collect and report. Horovod points are left out (and said so) when
    Horovod is not installed. Returns the report folder."""
    import importlib.util

    stream = stream or sys.stdout
    sweep = Path(sweep) if sweep else demo_sweep_file()
    overrides: list[str] = []
    if importlib.util.find_spec("horovod") is None:
        mapping = sweep_mapping(sweep)
        for section in ("points", "grid"):
            entries = mapping.get(section) or []
            kept = [e for e in map(_without_horovod, entries) if e is not None]
            if kept != entries:
                print(f"demo: Horovod is not installed: its {section} entries are left out", file=stream)
                overrides.append(f"{section}={yaml.safe_dump(kept, default_flow_style=True).strip()}")
    result = submit_sweep(sweep, out=out, cluster="local", overrides=overrides, stream=stream)
    return result.report or Path(out) / "report"
