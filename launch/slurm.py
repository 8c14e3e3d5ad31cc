"""`das submit`: render the Slurm scripts of a run and submit them.

Two jobs (DESIGN.md section 3):

1. ``extract.sbatch``: a job array of N tasks; each task is one ``accelerate launch`` of L
   local processes (``--gpus-per-task`` GPUs, or CPU processes), so the run has W = N * L
   ranks (``dist.current``). ``--signal=B:USR1@grace`` reaches the batch shell, which forwards
   SIGTERM to the launcher's process group: every worker drops or finishes its unit and exits
   75; the shell then requeues its own task (``--requeue``), and the rerun resumes from the
   markers. Each rank also stores the partial Gram of its train units.
2. ``reduce_score.sbatch``: ``das reduce`` (sums the partial Grams, or streams the store) and
   ``das score``, submitted with ``--dependency=afterok:<array>`` and
   ``--kill-on-invalid-dep=yes``, so a failed array task cancels it instead of leaving it
   pending forever.

Before submitting, the store and its splits are created here (the submitter plays rank 0), so
config, model and data errors surface at once, and no array task waits on task 0 being
scheduled. The templates live in ``launch/templates``; ``tests/golden`` holds their rendering
for fixed inputs (see tests/golden/README.md to regenerate).

Before any of that, the request is checked against the nodes ``sinfo`` lists for the partition
(``fit_to_nodes``): Slurm accepts a job that no node can run and leaves it pending forever
(reason PartitionConfig). Explicit CPUs, GPUs and memory that no node offers are refused; the
default CPUs (4 per process) shrink to what the largest suitable node has, with a note. The
submitted job ids go to ``<store stem>.slurm/jobs.json`` (also with --out-dir), which
``das status`` reads (launch/status.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import ConfigError, DasError
from .nodes import DEFAULT_CPUS_PER_PROCESS, check_against_cluster

TEMPLATES = Path(__file__).parent / "templates"
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$|^\d+-\d+$")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
JOBS_FILE = "jobs.json"


@dataclass(frozen=True)
class Plan:
    """Everything the scripts depend on; rendering is a pure function of it."""

    config: Path
    """Absolute path of the TOML config."""
    out_dir: Path
    """Where the scripts and logs/ go."""
    python: str
    """Interpreter that has das-pipeline installed (sys.executable of the submitter)."""
    array_tasks: int
    """N: extraction array tasks."""
    gpus_per_task: int
    """GPUs per array task (0: CPU)."""
    procs_per_task: int
    """L: processes per array task (one per GPU; CPU processes when gpus_per_task is 0)."""
    cpus_per_task: int
    """CPU cores per array task."""
    partition: str | None = None
    """Slurm partition of both jobs (None: the cluster default)."""
    time: str | None = None
    """Time limit per extraction task (Slurm format, e.g. 04:00:00)."""
    reduce_time: str | None = None
    """Time limit of the reduce + score job."""
    signal_grace_s: int = 120
    """Seconds before the time limit at which Slurm sends USR1 (graceful stop + requeue)."""
    job_name: str = "das"
    """Prefix of the job names."""
    sbatch_options: tuple[str, ...] = ()
    """Extra ``#SBATCH`` options for both jobs (e.g. --account=proj)."""

    @property
    def world(self) -> int:
        return self.array_tasks * self.procs_per_task


def _fill(template: str, values: dict[str, str]) -> str:
    out = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    assert "{{" not in out, out
    return out


def _directives(options: list[str]) -> str:
    return "\n".join(f"#SBATCH {o}" for o in options)


def launch_command(plan: Plan) -> str:
    """The ``accelerate launch`` line of one array task (without the das arguments)."""
    args = [plan.python, "-m", "accelerate.commands.launch", "--num_machines", "1",
            "--num_processes", str(plan.procs_per_task), "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_cpu_threads_per_process",
            str(max(1, plan.cpus_per_task // plan.procs_per_task))]
    if plan.procs_per_task > 1:
        # On CPU too: `--cpu --num_processes L` would start one process (dist.py); the ranks
        # create their accelerate state with cpu=True when CUDA is absent.
        args += ["--multi_gpu"]
    elif plan.gpus_per_task == 0:
        args += ["--cpu"]
    return " ".join(shlex.quote(a) for a in args)


def render(plan: Plan) -> dict[str, str]:
    """The two scripts, by file name."""
    common = [f"--partition={plan.partition}"] if plan.partition else []
    common += list(plan.sbatch_options)
    logs = plan.out_dir / "logs"
    extract = [f"--job-name={plan.job_name}-extract", f"--array=0-{plan.array_tasks - 1}",
               "--nodes=1", "--ntasks=1", f"--cpus-per-task={plan.cpus_per_task}"]
    if plan.gpus_per_task:
        extract.append(f"--gres=gpu:{plan.gpus_per_task}")
    if plan.time:
        extract.append(f"--time={plan.time}")
    extract += [f"--signal=B:USR1@{plan.signal_grace_s}", "--requeue", "--open-mode=append",
                f"--output={logs}/extract-%A_%a.out", *common]
    reduce = [f"--job-name={plan.job_name}-reduce", "--nodes=1", "--ntasks=1",
              f"--cpus-per-task={plan.cpus_per_task}", "--kill-on-invalid-dep=yes"]
    if plan.reduce_time:
        reduce.append(f"--time={plan.reduce_time}")
    reduce += [f"--output={logs}/reduce_score-%j.out", *common]
    das = f"{shlex.quote(plan.python)} -m das_pipeline.cli"
    values = {"version": __version__, "config": shlex.quote(str(plan.config)), "das": das,
              "array_tasks": str(plan.array_tasks), "world": str(plan.world),
              "procs_per_task": str(plan.procs_per_task), "launch": launch_command(plan)}
    return {
        "extract.sbatch": _fill((TEMPLATES / "extract.sbatch").read_text(),
                                {**values, "directives": _directives(extract)}),
        "reduce_score.sbatch": _fill((TEMPLATES / "reduce_score.sbatch").read_text(),
                                     {**values, "directives": _directives(reduce)}),
    }


def sbatch_commands(out_dir: Path, extract_id: str = "$EXTRACT_JOB_ID") -> list[list[str]]:
    """The two submissions; the second depends on the first succeeding as a whole."""
    return [["sbatch", "--parsable", str(out_dir / "extract.sbatch")],
            ["sbatch", "--parsable", f"--dependency=afterok:{extract_id}",
             str(out_dir / "reduce_score.sbatch")]]


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--array-tasks", type=int, required=True, help="extraction array tasks N")
    p.add_argument("--gpus-per-task", type=int, required=True,
                   help="GPUs per array task, one process each (0: CPU processes)")
    p.add_argument("--procs-per-task", type=int, default=None,
                   help="processes per array task (default: the GPU count, or 1 on CPU)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPU cores per array task (default: 4 per process, at most what the "
                        "largest node of the partition has)")
    p.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    p.add_argument("--time", help="time limit per extraction task, e.g. 04:00:00")
    p.add_argument("--reduce-time", help="time limit of the reduce + score job")
    p.add_argument("--signal-grace", type=int, default=120,
                   help="seconds before the time limit for the graceful stop (default 120)")
    p.add_argument("--job-name", default="das", help="job name prefix (default das)")
    p.add_argument("--sbatch-option", action="append", default=[],
                   help="extra #SBATCH option for both jobs, e.g. --sbatch-option=--account=x")
    p.add_argument("--out-dir", help="scripts and logs (default: <store>.slurm beside the store)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the scripts and sbatch commands; write and submit nothing")


def plan_from_args(args, cfg) -> Plan:
    """Validate the submit options (ConfigError names the option, the value and the fix)."""
    if args.array_tasks < 1:
        raise ConfigError(f"--array-tasks {args.array_tasks}: must be >= 1")
    if args.gpus_per_task < 0:
        raise ConfigError(f"--gpus-per-task {args.gpus_per_task}: must be >= 0 (0 runs on CPU)")
    procs = args.procs_per_task or max(args.gpus_per_task, 1)
    if procs < 1 or (args.gpus_per_task and procs != args.gpus_per_task):
        raise ConfigError(f"--procs-per-task {args.procs_per_task}: must be >= 1, and equal to "
                         f"--gpus-per-task ({args.gpus_per_task}) on GPUs (one process per GPU)")
    cpus = args.cpus_per_task or DEFAULT_CPUS_PER_PROCESS * procs
    if cpus < 1:
        raise ConfigError(f"--cpus-per-task {cpus}: must be >= 1")
    for name in ("time", "reduce_time"):
        value = getattr(args, name)
        if value is not None and not _TIME.match(value):
            raise ConfigError(f"--{name.replace('_', '-')} {value!r}: use a Slurm time such as "
                             f"30, 04:00:00 or 1-12:00:00")
    if args.signal_grace < 1:
        raise ConfigError(f"--signal-grace {args.signal_grace}: must be >= 1 second")
    for opt in args.sbatch_option:
        if not opt.startswith("--") or "\n" in opt:
            raise ConfigError(f"--sbatch-option {opt!r}: give one long option, e.g. "
                             f"--sbatch-option=--account=myproj")
    out_dir = Path(args.out_dir).resolve() if args.out_dir else slurm_dir(cfg.store.path)
    return Plan(config=Path(args.config).resolve(), out_dir=out_dir, python=sys.executable,
                array_tasks=args.array_tasks, gpus_per_task=args.gpus_per_task,
                procs_per_task=procs, cpus_per_task=cpus, partition=args.partition,
                time=args.time, reduce_time=args.reduce_time, signal_grace_s=args.signal_grace,
                job_name=args.job_name, sbatch_options=tuple(args.sbatch_option))


def slurm_dir(store: Path) -> Path:
    """``<store stem>.slurm`` beside the store: the default --out-dir, and where jobs.json is."""
    return store.with_name(store.name.removesuffix(".zarr") + ".slurm")


def record_jobs(store: Path, submission: dict) -> Path:
    """Make ``submission`` the latest entry of ``<store stem>.slurm/jobs.json`` (replacing an
    entry with the same extraction job id); written atomically. Returns the file's path."""
    path = slurm_dir(store) / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    past = json.loads(path.read_text())["submissions"] if path.exists() else []
    past = [s for s in past if s["extract"] != submission["extract"]] + [submission]
    tmp = path.with_name(f".{JOBS_FILE}.{os.getpid()}")
    tmp.write_text(json.dumps({"submissions": past}, indent=1) + "\n")
    tmp.replace(path)
    return path


def recorded_jobs(store: Path) -> dict | None:
    """The latest submission recorded for the store (keys: submitted, extract, array_tasks,
    reduce_score (None when its sbatch failed), out_dir), or None when nothing was submitted.
    Raises ValueError (or OSError) when the record is unreadable."""
    path = slurm_dir(store) / JOBS_FILE
    if not path.exists():
        return None
    submissions = json.loads(path.read_text()).get("submissions") or [None]
    return submissions[-1]


def _sbatch(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise DasError(f"`{shlex.join(cmd)}` failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0]


def submit(args) -> dict:
    """Render, then (unless --dry-run) create the store, write the scripts and submit them.

    Returns the job ids (also recorded in ``<store stem>.slurm/jobs.json``). Raises
    ConfigError for bad options or a request no node of the partition can run, other DasErrors
    for the config, model or data (before anything is submitted), and DasError when sbatch fails.
    """
    from ..config import load_config
    from ..ensemble import refuse_ensemble

    cfg = load_config(args.config)
    refuse_ensemble(cfg, "submit")
    plan = check_against_cluster(plan_from_args(args, cfg), cpus_given=bool(args.cpus_per_task))
    scripts = render(plan)
    cmds = sbatch_commands(plan.out_dir)
    if args.dry_run:
        for name, text in scripts.items():
            print(f"# ---- {plan.out_dir / name} ----\n{text}")
        print("# ---- submission ----")
        print(f"EXTRACT_JOB_ID=$({shlex.join(cmds[0])})")
        print(f"sbatch --parsable --dependency=afterok:$EXTRACT_JOB_ID "
              f"{shlex.quote(cmds[1][-1])}")
        return {}
    if shutil.which("sbatch") is None:
        raise ConfigError("`sbatch` is not on PATH: run `das submit` on a Slurm login node, or use "
                         "--dry-run to print the scripts")
    from .. import dist
    from ..extract import open_splits, prepare

    open_splits(prepare(cfg), dist.RankInfo(0, plan.world, 0, None))  # rank 0's creation
    (plan.out_dir / "logs").mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (plan.out_dir / name).write_text(text)
    extract_id = _sbatch(cmds[0])
    entry = {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), "extract": extract_id,
             "array_tasks": plan.array_tasks, "reduce_score": None, "out_dir": str(plan.out_dir)}
    record_jobs(cfg.store.path, entry)  # at once: the array runs even if the next sbatch fails
    reduce_id = _sbatch(sbatch_commands(plan.out_dir, extract_id)[1])
    record_jobs(cfg.store.path, {**entry, "reduce_score": reduce_id})
    print(f"submitted extraction array {extract_id} ({plan.array_tasks} tasks x "
          f"{plan.procs_per_task} processes = {plan.world} ranks) and reduce + score {reduce_id} "
          f"(afterok:{extract_id}); scripts and logs in {plan.out_dir}\n"
          f"follow with: das status {args.config}   squeue -j {extract_id},{reduce_id}")
    return {"extract": extract_id, "reduce_score": reduce_id, "out_dir": str(plan.out_dir)}
