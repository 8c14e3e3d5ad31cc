"""`das submit` against the nodes `sinfo` lists, and the Slurm lines of `das status`.

No Slurm needed: fake `sinfo`, `sbatch`, `squeue` and `sacct` (shell scripts using only shell
builtins, so PATH can hold nothing else) print what a real cluster prints and log their
arguments. tests/test_slurm.py repeats the main cases on the real local cluster.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from das_pipeline.cli import main
from das_pipeline.config import load_config
from das_pipeline.launch.nodes import fit_to_nodes, gres_gpus, parse_sinfo
from das_pipeline.launch.slurm import Plan, record_jobs, recorded_jobs, slurm_dir
from das_pipeline.launch.status import slurm_lines, status_lines

# `sinfo -h -N --all -o '%N|%c|%m|%G|%P'` of a cluster with a default CPU partition, H100
# nodes (one of them also in a preemptible partition), A100 nodes with MIG slices as a second
# gpu type, and a small debug partition.
CLUSTER = """\
cpu001|64|257000|(null)|cpu*
cpu002|64|257000|(null)|cpu*
gpu001|96|1031000|gpu:h100:8(S:0-1)|gpu
gpu002|96|1031000|gpu:h100:8(S:0-1)|gpu
gpu002|96|1031000|gpu:h100:8(S:0-1)|preempt
a100n1|32|515000|gpu:a100:4(S:0),gpu:a100_1g.10gb:2(S:1)|a100
a100n2|32|515000|gpu:a100:4(S:0),gpu:a100_1g.10gb:2(S:1)|a100
small1|2|7800|gpu:tesla:1,mps:100|debug
"""
NODES = parse_sinfo(CLUSTER)


def fake_tool(bin_dir: Path, name: str, stdout: str = "", rc: int = 0, stderr: str = "") -> Path:
    """An executable ``bin_dir/name`` printing ``stdout`` (and ``stderr``) and exiting ``rc``;
    each call appends its arguments to ``bin_dir/name.calls``."""
    bin_dir.mkdir(exist_ok=True)
    body = "".join(f"printf '%s\\n' {shlex.quote(line)}\n" for line in stdout.splitlines())
    if stderr:
        body += f"printf '%s\\n' {shlex.quote(stderr)} >&2\n"
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {shlex.quote(str(path))}.calls\n"
                    f"{body}exit {rc}\n")
    path.chmod(0o755)
    return path


def fake_sbatch(bin_dir: Path, first_id: int = 4001) -> Path:
    """A `sbatch --parsable` answering ids first_id, first_id + 1, ... (with a cluster name)."""
    count = bin_dir / "sbatch.count"
    path = fake_tool(bin_dir, "sbatch")
    path.write_text(path.read_text().replace(
        "exit 0\n", f"n=0; [ -f {count} ] && read n < {count}; echo $((n + 1)) > {count}\n"
                    f"echo \"$(({first_id} + n));daslocal\"\n"))
    return path


def calls(bin_dir: Path, name: str) -> list[str]:
    log = bin_dir / f"{name}.calls"
    return log.read_text().splitlines() if log.exists() else []


def plan(**kw) -> Plan:
    kw = {"array_tasks": 2, "gpus_per_task": 0, "procs_per_task": 1, "cpus_per_task": 4, **kw}
    return Plan(config=Path("/p/run.toml"), out_dir=Path("/p/run.slurm"), python="python", **kw)


@pytest.mark.parametrize("gres, gpus", [
    ("(null)", 0), ("gpu:8", 8), ("gpu:h100:8(S:0-1)", 8), ("gpu:h100:8(S:0,1)", 8),
    ("gpu:a100:4(S:0),gpu:a100_1g.10gb:2(S:1)", 6), ("gpu:tesla:1,mps:100", 1),
    ("mps:400,gpu:2(IDX:0-1)", 2), ("nvme:1", 0),
])
def test_gres_strings_give_the_gpu_count(gres, gpus):
    assert gres_gpus(gres) == gpus


def test_sinfo_lines_give_nodes_per_partition_with_the_default_marker():
    assert len(NODES) == 8
    assert {n.partition for n in NODES if n.default} == {"cpu"}
    gpu002 = [n for n in NODES if n.name == "gpu002"]
    assert [(n.partition, n.cpus, n.mem_mb, n.gpus) for n in gpu002] == [
        ("gpu", 96, 1031000, 8), ("preempt", 96, 1031000, 8)]


@pytest.mark.parametrize("kw, cpus_given, message", [
    ({"cpus_per_task": 65}, True,
     "--cpus-per-task 65: no node of the default partition 'cpu' has 65 CPUs (the largest has "
     "64: cpu001); ask for at most --cpus-per-task 64, or choose another --partition"),
    ({"cpus_per_task": 33, "partition": "a100", "gpus_per_task": 4, "procs_per_task": 4}, True,
     "--cpus-per-task 33: no node of partition 'a100' has 33 CPUs (the largest has 32: a100n1)"),
    ({"gpus_per_task": 8, "procs_per_task": 8, "partition": "a100"}, False,
     "--gpus-per-task 8: no node of partition 'a100' has 8 GPUs (the most on one node: 6, on "
     "a100n1); use --gpus-per-task 6 or fewer (and more --array-tasks for as many ranks)"),
    ({"gpus_per_task": 1}, False,
     "--gpus-per-task 1: no node of the default partition 'cpu' has 1 GPU (the most on one "
     "node: 0, on cpu001); use --gpus-per-task 0 (CPU processes) or a partition with GPUs"),
    ({"partition": "h100"}, False,
     "--partition h100: sinfo lists no partition 'h100' (it lists a100, cpu*, debug, gpu, "
     "preempt; * = the default); choose one of them"),
    ({"partition": "gpu,h100"}, False, "--partition gpu,h100: sinfo lists no partition 'h100'"),
    ({"sbatch_options": ("--partition=nope",)}, False,
     "--sbatch-option=--partition=nope: sinfo lists no partition 'nope'"),
    ({"partition": "a100", "sbatch_options": ("--mem=600G",)}, False,
     "--sbatch-option=--mem=600G: a task needs 614400 MB, and no node of partition 'a100' has "
     "that much memory (the largest has 515000 MB: a100n1); ask for less"),
    ({"partition": "a100", "cpus_per_task": 32, "sbatch_options": ("--mem-per-cpu=20G",)}, True,
     "--sbatch-option=--mem-per-cpu=20G: a task needs 655360 MB"),
    ({"sbatch_options": ("--mem=lots",)}, False,
     "--sbatch-option=--mem=lots: 'lots' is not a Slurm memory size; use e.g. 64G or 4000M"),
    ({"partition": "cpu,debug", "gpus_per_task": 1, "cpus_per_task": 8}, True,
     "--cpus-per-task 8 with --gpus-per-task 1: no single node of partition 'cpu,debug' offers "
     "all of it (its nodes have: 64 CPUs, 0 GPUs, 257000 MB; 2 CPUs, 1 GPU, 7800 MB); lower "
     "one of them, or choose another --partition"),
])
def test_requests_no_node_can_run_are_refused_naming_option_value_and_largest_node(
        kw, cpus_given, message):
    with pytest.raises(ValueError) as err:
        fit_to_nodes(plan(**kw), NODES, cpus_given)
    assert message in str(err.value)


@pytest.mark.parametrize("kw, cpus_given", [
    ({"cpus_per_task": 64}, True),
    ({"partition": "gpu,a100", "gpus_per_task": 8, "procs_per_task": 8, "cpus_per_task": 32}, False),
    ({"partition": "preempt", "gpus_per_task": 8, "procs_per_task": 8, "cpus_per_task": 96}, True),
    ({"partition": "a100", "gpus_per_task": 4, "procs_per_task": 4, "cpus_per_task": 16,
      "sbatch_options": ("--mem-per-cpu=20G",)}, False),  # 16 x 20 GB fits 515 GB
    ({"partition": "debug", "cpus_per_task": 2, "sbatch_options": ("--mem=0",)}, True),
])
def test_requests_some_node_can_run_pass_unchanged(kw, cpus_given):
    assert fit_to_nodes(plan(**kw), NODES, cpus_given) == (plan(**kw), [])


def test_default_cpus_shrink_to_the_largest_fitting_node_with_a_note():
    fitted, notes = fit_to_nodes(plan(partition="debug", gpus_per_task=1, procs_per_task=1,
                                      cpus_per_task=4), NODES, cpus_given=False)
    assert fitted.cpus_per_task == 2
    assert notes == ["note: --cpus-per-task 2: the default, 4 per process (4), is more than any "
                     "node of partition 'debug' that fits the request has; pass --cpus-per-task "
                     "to choose"]
    # The node that decides is one with the GPUs: 2 H100 processes get 8 CPUs, not 96 or 32.
    fitted, notes = fit_to_nodes(plan(partition="gpu,debug", gpus_per_task=2, procs_per_task=2,
                                      cpus_per_task=8), NODES, cpus_given=False)
    assert (fitted.cpus_per_task, notes) == (8, [])
    # Memory per CPU counts at the lowered CPUs: 2 x 4000 MB does not fit small1's 7800 MB.
    with pytest.raises(ValueError, match="no single node of partition 'debug' offers all of it"):
        fit_to_nodes(plan(partition="debug", sbatch_options=("--mem-per-cpu=4000M",)), NODES, False)


def test_without_a_default_partition_the_check_is_skipped_with_a_warning():
    nodes = parse_sinfo(CLUSTER.replace("cpu*", "cpu"))
    assert fit_to_nodes(plan(cpus_per_task=500), nodes, True) == (
        plan(cpus_per_task=500), ["warning: sinfo shows no default partition: the request is not "
                                  "checked against the nodes (give --partition to check it)"])


@pytest.fixture
def fake_bin(tmp_path, monkeypatch) -> Path:
    """A folder of fake Slurm clients that is all of PATH (the host's Slurm, if any, is hidden)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


@pytest.mark.parametrize("dry_run", [True, False])
def test_submit_refuses_before_creating_or_submitting_anything(make_config, fake_bin, tmp_path,
                                                               capsys, dry_run):
    fake_tool(fake_bin, "sinfo", CLUSTER)
    fake_sbatch(fake_bin)
    args = ["submit", str(make_config()), "--array-tasks", "2", "--gpus-per-task", "4",
            "--partition", "a100", "--cpus-per-task", "48"]
    assert main(args + ["--dry-run"] * dry_run) == 2
    err = capsys.readouterr().err
    assert "das submit: error: --cpus-per-task 48: no node of partition 'a100' has 48 CPUs" in err
    assert "ask for at most --cpus-per-task 32" in err
    assert calls(fake_bin, "sinfo") == ["-h -N --all -o %N|%c|%m|%G|%P"]
    assert calls(fake_bin, "sbatch") == []
    assert not (tmp_path / "store.zarr").exists() and not (tmp_path / "store.slurm").exists()


def test_default_cpus_adapt_to_the_nodes_in_the_rendered_script(make_config, fake_bin, capsys):
    fake_tool(fake_bin, "sinfo", CLUSTER)
    assert main(["submit", str(make_config()), "--array-tasks", "1", "--gpus-per-task", "1",
                 "--partition", "debug", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "#SBATCH --cpus-per-task=2\n" in out and "#SBATCH --gres=gpu:1\n" in out
    assert "das submit: note: --cpus-per-task 2: the default, 4 per process (4)" in err


@pytest.mark.parametrize("sinfo, warning", [
    (None, "das submit: warning: `sinfo` is not on PATH: the request is not checked against the "
           "nodes (a task that no node can run would pend forever)"),
    ({"rc": 1, "stderr": "sinfo: error: Unable to contact slurm controller (connect failure)"},
     "das submit: warning: `sinfo -h -N --all -o '%N|%c|%m|%G|%P'` failed (sinfo: error: Unable "
     "to contact slurm controller (connect failure)): the request is not checked"),
])
def test_dry_run_without_a_working_sinfo_renders_with_a_warning(make_config, fake_bin, capsys,
                                                               sinfo, warning):
    if sinfo is not None:
        fake_tool(fake_bin, "sinfo", **sinfo)
    assert main(["submit", str(make_config()), "--array-tasks", "2", "--gpus-per-task", "0",
                 "--cpus-per-task", "500", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "#SBATCH --cpus-per-task=500\n" in out
    assert warning in err


def test_submit_records_the_jobs_and_status_shows_their_state(make_config, fake_bin, tmp_path,
                                                               capsys):
    fake_tool(fake_bin, "sinfo", CLUSTER)
    fake_sbatch(fake_bin, first_id=4001)
    cfg = make_config()
    assert main(["submit", str(cfg), "--array-tasks", "4", "--gpus-per-task", "0",
                 "--cpus-per-task", "2", "--out-dir", str(tmp_path / "elsewhere")]) == 0
    assert "extraction array 4001 " in capsys.readouterr().out
    assert calls(fake_bin, "sbatch") == [
        f"--parsable {tmp_path}/elsewhere/extract.sbatch",
        f"--parsable --dependency=afterok:4001 {tmp_path}/elsewhere/reduce_score.sbatch"]
    # The record sits in <store stem>.slurm even with --out-dir, where das status looks.
    record = json.loads((tmp_path / "store.slurm" / "jobs.json").read_text())["submissions"]
    assert [(s["extract"], s["reduce_score"], s["array_tasks"], s["out_dir"]) for s in record] == [
        ("4001", "4002", 4, str(tmp_path / "elsewhere"))]

    fake_tool(fake_bin, "squeue", "4001_[2-3] PENDING Resources\n4002 PENDING Dependency\n"
                                  "4001_1 RUNNING None\n4001_0 RUNNING None\n")
    lines = status_lines(load_config(cfg))
    assert lines[-5].startswith("slurm: extraction array 4001 (4 tasks) and reduce + score 4002, "
                                "submitted 20")
    assert lines[-4:] == ["slurm: 4001_0 RUNNING", "slurm: 4001_1 RUNNING",
                          "slurm: 4001_[2-3] PENDING (Resources)", "slurm: 4002 PENDING (Dependency)"]
    assert calls(fake_bin, "squeue") == ["-h --states=all --jobs=4001,4002 -o %i %T %r"]
    assert main(["status", str(cfg)]) == 0
    assert "slurm: 4001_[2-3] PENDING (Resources)\nslurm: 4002 PENDING (Dependency)\n" in (
        capsys.readouterr().out)


def test_status_without_recorded_jobs_has_no_slurm_lines(make_config, fake_bin, tmp_path):
    fake_tool(fake_bin, "squeue", "99 RUNNING None")
    assert recorded_jobs(tmp_path / "store.zarr") is None
    assert slurm_lines(tmp_path / "store.zarr") == []
    assert calls(fake_bin, "squeue") == []


@pytest.fixture
def recorded(tmp_path) -> Path:
    store = tmp_path / "run.zarr"
    record_jobs(store, {"submitted": "2026-12-02T10:00:00", "extract": "77", "array_tasks": 20,
                        "reduce_score": "78", "out_dir": str(tmp_path / "run.slurm")})
    assert slurm_dir(store) == tmp_path / "run.slurm"
    return store


def test_status_without_squeue_says_so_in_one_line(recorded, fake_bin):
    assert slurm_lines(recorded) == [
        "slurm: squeue: `squeue` is not on PATH: the state of the extraction array 77 (20 tasks) "
        "and reduce + score 78, submitted 2026-12-02T10:00:00 is unknown here"]


def test_status_of_a_big_array_counts_tasks_per_state(recorded, fake_bin):
    rows = ["77_[10-19%4] PENDING Resources", "78 PENDING Dependency", "77_8 PENDING PartitionConfig"]
    rows += [f"77_{i} RUNNING None" for i in range(4)] + [f"77_{i} COMPLETED None" for i in range(4, 8)]
    fake_tool(fake_bin, "squeue", "\n".join(rows))
    assert slurm_lines(recorded)[1:] == [
        "slurm: 77 array tasks: 10 PENDING (Resources), 4 RUNNING, 4 COMPLETED, 1 PENDING "
        "(PartitionConfig): no node of the partition can run it: scancel it and submit again "
        "with fewer CPUs, GPUs or memory",
        "slurm: 78 PENDING (Dependency)"]


def test_status_of_jobs_that_left_the_queue_asks_sacct(recorded, fake_bin, tmp_path):
    fake_tool(fake_bin, "squeue", rc=1, stderr="slurm_load_jobs error: Invalid job id specified")
    lines = slurm_lines(recorded)
    assert lines[1:] == [
        "slurm: 77 no longer in the queue, state unknown (sacct: `sacct` is not on PATH); logs in "
        f"{tmp_path}/run.slurm/logs",
        "slurm: 78 no longer in the queue, state unknown (sacct: `sacct` is not on PATH); logs in "
        f"{tmp_path}/run.slurm/logs"]
    fake_tool(fake_bin, "sacct", "77_0|COMPLETED\n77_1|FAILED\n78|CANCELLED by 0\n")
    assert slurm_lines(recorded)[1:] == ["slurm: 77_0 COMPLETED", "slurm: 77_1 FAILED",
                                         "slurm: 78 CANCELLED by 0"]
    assert calls(fake_bin, "sacct")[-1] == "-n -X -P --jobs=77,78 -o JobID,State"
    fake_tool(fake_bin, "squeue", rc=1, stderr="squeue: error: Unable to contact slurm controller")
    assert slurm_lines(recorded) == [
        "slurm: squeue: squeue: error: Unable to contact slurm controller: the state of the "
        "extraction array 77 (20 tasks) and reduce + score 78, submitted 2026-12-02T10:00:00 is "
        "unknown here"]
