"""`das submit` against a real single-node Slurm on localhost (launch/local_slurm.sh).

The module starts the private cluster (slurmctld + slurmd + munged) when it is not running
and stops what it started at the end; without root/apt/packages it skips with the reason.

- The tiny config through an extraction array (2 tasks x 2 CPU ranks) whose task 0 is stopped
  with USR1 (what --signal sends) after its first unit and requeued; the dependent reduce +
  score job starts only after the array and its scores equal the single-process run.
- A failing array task cancels the dependent job instead of leaving it pending.
- A request the node cannot satisfy (more CPUs than it has, a GPU) is refused before anything is
  created or submitted; the default CPUs shrink to the node's.
- `das status` shows the Slurm state and pending reason of the submitted jobs.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_dist import DAS, make_reference, run, write_config

from das_pipeline.config import load_config
from das_pipeline.store import Store, read_scores

SCRIPT = Path(__file__).resolve().parent.parent / "launch" / "local_slurm.sh"
pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """Environment (SLURM_CONF) of a running local cluster; started here if needed."""
    conf = Path(os.environ.get("DAS_SLURM_DIR", "/var/tmp/das-slurm")) / "slurm.conf"
    started = False
    if subprocess.run(["bash", SCRIPT, "status"], capture_output=True).returncode != 0:
        up = subprocess.run(["bash", SCRIPT, "up"], capture_output=True, text=True, timeout=600)
        if up.returncode == 3:
            pytest.skip(f"no local Slurm: {up.stderr.strip()}")
        assert up.returncode == 0, up.stdout + up.stderr
        started = True
    yield {"SLURM_CONF": str(conf)}
    if started:
        subprocess.run(["bash", SCRIPT, "down"], capture_output=True, timeout=120)


@pytest.fixture
def reference(tmp_path_factory, tiny_model_dir) -> Path:
    return make_reference(tmp_path_factory, tiny_model_dir)


def slurm_cmd(env: dict, *args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def jobs(env: dict, job_id: str) -> list[dict[str, str]]:
    """`scontrol show job` records (one per array task) as dicts."""
    out = slurm_cmd(env, "scontrol", "show", "job", "-o", job_id)
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.strip().splitlines()]


def wait_until(predicate, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            texts = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*")))
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{texts}")
        time.sleep(1)


def queued(env: dict, *ids: str) -> bool:
    return bool(slurm_cmd(env, "squeue", "-h", "-o", "%i", "-j", ",".join(ids)).strip())


def submit(env: dict, cfg: Path, *args: str, **extra_env: str) -> tuple[str, str]:
    done = run([*DAS, "submit", cfg, "--cpus-per-task", "1", "--time", "15", *args],
               **env, **extra_env)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = re.search(r"extraction array (\d+) .* reduce \+ score (\d+)", done.stdout)
    assert ids, done.stdout
    return ids.group(1), ids.group(2)


def stamp(value: str) -> float:
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def test_submit_preempt_requeue_then_reduce_score_equals_single_process(slurm, reference, tmp_path,
                                                                         tiny_model_dir):
    cfg = write_config(tmp_path / "slurm.toml", tiny_model_dir, tmp_path / "slurm.zarr",
                       rows_per_unit=2)
    array, dependent = submit(slurm, cfg, "--array-tasks", "2", "--gpus-per-task", "0",
                              "--procs-per-task", "2")
    logs = tmp_path / "slurm.slurm" / "logs"
    store = tmp_path / "slurm.zarr"
    assert jobs(slurm, dependent)[0]["JobState"] == "PENDING"

    def task0_marked_a_unit() -> bool:  # ranks 0 and 1 belong to array task 0
        markers = Store.open_existing(store).split("train").markers()
        return bool(((markers[:, 0] == 1) & (markers[:, 4] <= 1)).any())

    wait_until(task0_marked_a_unit, 300, "a unit of array task 0", logs)
    slurm_cmd(slurm, "scancel", "--batch", "--signal=USR1", f"{array}_0")  # as --signal does
    wait_until(lambda: [(j["JobState"], j["Restarts"]) for j in jobs(slurm, f"{array}_0")]
               == [("PENDING", "1")], 120, "the requeue of task 0", logs)
    # Slurm delays a requeued job's start by minutes; release it now, but only once the old
    # instance's slurmstepd is gone: releasing earlier races the clean-up ("Job credential
    # revoked") and fails the task, which a real requeue's delay never does.
    job_id = jobs(slurm, f"{array}_0")[0]["JobId"]
    wait_until(lambda: subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{job_id}\."],
                                      capture_output=True).returncode != 0,
               120, "the end of task 0's first instance", logs)
    time.sleep(3)
    slurm_cmd(slurm, "scontrol", "update", f"JobId={array}_0", "StartTime=now")
    wait_until(lambda: not queued(slurm, array, dependent), 600, "the array and reduce + score",
               logs)

    tasks = jobs(slurm, array)
    summary = [(t["ArrayTaskId"], t["JobState"], t["ExitCode"], t["Reason"]) for t in tasks]
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1"]
    assert all(t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0" for t in tasks), summary
    (after,) = jobs(slurm, dependent)
    assert after["JobState"] == "COMPLETED", after
    assert stamp(after["StartTime"]) >= max(stamp(t["EndTime"]) for t in tasks)
    log0 = (logs / f"extract-{array}_0.out").read_text()
    assert "stopped (exit" in log0 and "requeued" in log0 and "finished (exit 0)" in log0
    assert "summed 4 partial Grams of world 4" in (logs / f"reduce_score-{dependent}.out").read_text()
    markers = Store.open_existing(store).split("train").markers()
    assert set(markers[:, 4].astype(int)) == {0, 1, 2, 3}

    cfg_ref, cfg_run = load_config(reference), load_config(cfg)
    for method in ("trak", "dtrak", "das"):
        want = read_scores(cfg_ref.store.path, "val", method)
        got = read_scores(cfg_run.store.path, "val", method)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5 * np.abs(want).max(),
                                   err_msg=f"{method} scores differ from the single-process run")


def test_failing_array_task_cancels_the_dependent_job(slurm, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "fail.toml", tiny_model_dir, tmp_path / "fail.zarr")
    # Array task 1's worker is SIGKILLed at its first claim (the hook of pipeline/dist.py).
    array, dependent = submit(slurm, cfg, "--array-tasks", "2", "--gpus-per-task", "0",
                              DAS_FAULT="claim:1", DAS_FAULT_TASK="1")
    logs = tmp_path / "fail.slurm" / "logs"
    wait_until(lambda: not queued(slurm, array, dependent), 600,
               "the array to end and the dependent job to leave the queue", logs)
    states = {t["ArrayTaskId"]: t["JobState"] for t in jobs(slurm, array)}
    assert states == {"0": "COMPLETED", "1": "FAILED"}
    (after,) = jobs(slurm, dependent)
    assert after["JobState"] == "CANCELLED", after
    assert (after["Reason"], after["RunTime"]) == ("DependencyNeverSatisfied", "00:00:00"), after
    assert "task 1 failed (exit 1)" in (logs / f"extract-{array}_1.out").read_text()
    assert not (tmp_path / "fail.reports").exists()  # score never ran


def node_cpus(env: dict) -> int:
    return max(int(c) for c in slurm_cmd(env, "sinfo", "-h", "-N", "-o", "%c").split())


@pytest.mark.parametrize("option", ["--cpus-per-task", "--gpus-per-task"])
def test_submit_refuses_what_the_node_cannot_offer(slurm, tmp_path, tiny_model_dir, option):
    cpus = node_cpus(slurm)
    cfg = write_config(tmp_path / "big.toml", tiny_model_dir, tmp_path / "big.zarr")
    name = f"refused-{tmp_path.name}"
    ask = ["--gpus-per-task", "0", "--cpus-per-task", str(cpus + 1)] if option == "--cpus-per-task" \
        else ["--gpus-per-task", "1"]
    done = run([*DAS, "submit", cfg, "--array-tasks", "1", "--job-name", name, *ask], **slurm)
    assert done.returncode == 2, done.stdout + done.stderr
    want = (f"--cpus-per-task {cpus + 1}: no node of the default partition 'debug' has {cpus + 1} "
            f"CPUs (the largest has {cpus}: localhost); ask for at most --cpus-per-task {cpus}"
            if option == "--cpus-per-task" else
            "--gpus-per-task 1: no node of the default partition 'debug' has 1 GPU (the most on "
            "one node: 0, on localhost); use --gpus-per-task 0 (CPU processes)")
    assert want in done.stderr
    assert not slurm_cmd(slurm, "squeue", "-h", "--states=all", f"--name={name}-extract,{name}-reduce",
                         "-o", "%i").strip()
    assert not (tmp_path / "big.zarr").exists() and not (tmp_path / "big.slurm").exists()


def test_default_cpus_shrink_to_the_node(slurm, tmp_path, tiny_model_dir):
    cpus = node_cpus(slurm)
    cfg = write_config(tmp_path / "dry.toml", tiny_model_dir, tmp_path / "dry.zarr")
    # `cpus` processes: the default, 4 per process, is 4 x what the node has.
    done = run([*DAS, "submit", cfg, "--array-tasks", "1", "--gpus-per-task", "0",
                "--procs-per-task", str(cpus), "--dry-run"], **slurm)
    assert done.returncode == 0, done.stderr
    assert f"#SBATCH --cpus-per-task={cpus}\n" in done.stdout
    assert (f"das submit: note: --cpus-per-task {cpus}: the default, 4 per process ({4 * cpus}), "
            f"is more than any node of the default partition 'debug'") in done.stderr


def test_status_shows_the_state_and_pending_reason_of_the_jobs(slurm, tmp_path, tiny_model_dir):
    cfg = write_config(tmp_path / "held.toml", tiny_model_dir, tmp_path / "held.zarr")
    array, dependent = submit(slurm, cfg, "--array-tasks", "2", "--gpus-per-task", "0",
                              "--sbatch-option=--hold")
    logs = tmp_path / "held.slurm" / "logs"
    try:
        # --hold held both jobs; released, the reduce + score job waits on the held array.
        slurm_cmd(slurm, "scontrol", "release", dependent)
        wait_until(lambda: jobs(slurm, dependent)[0]["Reason"] == "Dependency", 60,
                   "the dependent job's reason Dependency", logs)
        out = run([*DAS, "status", cfg], **slurm).stdout
        assert (f"slurm: extraction array {array} (2 tasks) and reduce + score {dependent}, "
                f"submitted ") in out
        assert (f"slurm: {array}_[0-1] PENDING (JobHeldUser)\n"
                f"slurm: {dependent} PENDING (Dependency)\n") in out, out
    finally:
        slurm_cmd(slurm, "scancel", array, dependent)
    wait_until(lambda: not queued(slurm, array, dependent), 60, "the cancelled jobs to end", logs)
    out = run([*DAS, "status", cfg], **slurm).stdout
    assert f"slurm: {array}_[0-1] CANCELLED (JobHeldUser)\n" in out, out
    assert f"slurm: {dependent} CANCELLED" in out, out
