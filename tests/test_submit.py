"""`das submit`: rendered sbatch scripts against golden files, --dry-run, and option errors.

Golden files (tests/golden/*.sbatch) are the rendering of fixed plans; after an intended
change to launch/templates or launch/slurm.py regenerate them with

    DAS_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_submit.py

and review the diff (tests/golden/README.md). A fake `sinfo` (tests/test_slurm_checks.py) stands
for the cluster, so the host's Slurm, if any, does not decide the outcome.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_slurm_checks import CLUSTER, fake_tool

from das_pipeline.cli import main
from das_pipeline.launch.slurm import Plan, render

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(autouse=True)
def fake_cluster(tmp_path, monkeypatch):
    """A fake `sinfo` first on PATH (partitions cpu*, gpu, preempt, a100, debug)."""
    fake_tool(tmp_path / "fake_bin", "sinfo", CLUSTER)
    monkeypatch.setenv("PATH", f"{tmp_path / 'fake_bin'}:{os.environ['PATH']}")

PLANS = {
    "cpu": Plan(config=Path("/project/run.toml"), out_dir=Path("/project/runs/store.slurm"),
                python="/opt/das/bin/python", array_tasks=2, gpus_per_task=0, procs_per_task=2,
                cpus_per_task=2),
    "gpu": Plan(config=Path("/project/run.toml"), out_dir=Path("/project/runs/store.slurm"),
                python="/opt/das/bin/python", array_tasks=16, gpus_per_task=4, procs_per_task=4,
                cpus_per_task=32, partition="gpu", time="04:00:00", reduce_time="02:00:00",
                signal_grace_s=300, job_name="cifar", sbatch_options=("--account=attrib",)),
}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_rendered_scripts_match_golden_files(plan_name):
    for file_name, text in render(PLANS[plan_name]).items():
        golden = GOLDEN / f"{plan_name}_{file_name}"
        if os.environ.get("DAS_UPDATE_GOLDEN") == "1":
            golden.write_text(text)
        assert golden.exists(), f"{golden} is missing: run DAS_UPDATE_GOLDEN=1 pytest {__file__}"
        assert text == golden.read_text(), (
            f"{file_name} rendered for plan {plan_name!r} differs from {golden}; if intended, "
            f"regenerate with DAS_UPDATE_GOLDEN=1 and review the diff")


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_rendered_scripts_are_valid_bash_with_the_slurm_contract(plan_name, tmp_path):
    scripts = render(PLANS[plan_name])
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
        done = subprocess.run(["bash", "-n", str(tmp_path / name)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    extract, reduce = scripts["extract.sbatch"], scripts["reduce_score.sbatch"]
    plan = PLANS[plan_name]
    assert f"#SBATCH --array=0-{plan.array_tasks - 1}\n" in extract
    assert f"#SBATCH --signal=B:USR1@{plan.signal_grace_s}\n" in extract
    assert "#SBATCH --requeue\n" in extract and "scontrol requeue" in extract
    assert f"--num_processes {plan.procs_per_task} " in extract
    assert ("--multi_gpu" in extract) == (plan.procs_per_task > 1)
    assert ("#SBATCH --gres=gpu:" in extract) == (plan.gpus_per_task > 0)
    assert "#SBATCH --kill-on-invalid-dep=yes\n" in reduce
    assert reduce.index(" reduce ") < reduce.index(" score ")


def test_dry_run_prints_scripts_and_submits_nothing(make_config, capsys, tmp_path):
    cfg = make_config()
    code = main(["submit", str(cfg), "--array-tasks", "3", "--gpus-per-task", "2",
                 "--partition", "a100", "--time", "1:00:00", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "#SBATCH --array=0-2\n" in out and "#SBATCH --gres=gpu:2\n" in out
    assert "#SBATCH --partition=a100\n" in out and "#SBATCH --time=1:00:00\n" in out
    assert "--dependency=afterok:$EXTRACT_JOB_ID" in out
    assert "export DAS_ARRAY_TASKS=3\n" in out
    assert not (tmp_path / "store.zarr").exists() and not (tmp_path / "store.slurm").exists()


@pytest.mark.parametrize("args, message", [
    (["--array-tasks", "0", "--gpus-per-task", "1"], "--array-tasks 0: must be >= 1"),
    (["--array-tasks", "2", "--gpus-per-task", "-1"], "--gpus-per-task -1: must be >= 0"),
    (["--array-tasks", "2", "--gpus-per-task", "4", "--procs-per-task", "2"],
     "--procs-per-task 2: must be >= 1, and equal to --gpus-per-task (4)"),
    (["--array-tasks", "2", "--gpus-per-task", "1", "--time", "4h"], "--time '4h': use a Slurm time"),
    (["--array-tasks", "2", "--gpus-per-task", "1", "--sbatch-option", "account=x"],
     "--sbatch-option 'account=x': give one long option"),
])
def test_bad_submit_options_name_the_option_and_the_fix(make_config, capsys, args, message):
    assert main(["submit", str(make_config()), *args, "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_submit_without_sbatch_says_what_to_do(make_config, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert main(["submit", str(make_config()), "--array-tasks", "1", "--gpus-per-task", "0"]) == 2
    assert "`sbatch` is not on PATH" in capsys.readouterr().err
    assert not (tmp_path / "store.zarr").exists()
