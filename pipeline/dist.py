"""The one place that knows about ranks, devices, launchers and signals.

Rank plan (DESIGN.md section 3): under a Slurm job array each array task runs ``L`` local
processes (accelerate launch / torchrun); global rank = task_id * L + local_rank, world =
num_tasks * L. Unit u belongs to rank u mod world. No communication is needed.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on request, run me again"


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current(device: str | None = None) -> RankInfo:
    """This process's place in the run, from launcher and Slurm environment variables.

    Under ``accelerate launch``/``torchrun`` (WORLD_SIZE set) accelerate's PartialState is
    created with ``cpu=True`` when CUDA is absent, so CPU processes really are distinct ranks.
    """
    local_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if local_world > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not use_cuda)
        local_world, local_rank = state.num_processes, state.process_index
        dev = state.device
    else:
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if device is not None and not device.startswith("cuda"):
        dev = torch.device(device)
    num_tasks = int(os.environ.get("DAS_ARRAY_TASKS", os.environ.get("SLURM_ARRAY_TASK_COUNT", "1")))
    task = int(os.environ.get("DAS_ARRAY_TASK_ID", os.environ.get("SLURM_ARRAY_TASK_ID", "0")))
    if "SLURM_ARRAY_TASK_MIN" in os.environ and "DAS_ARRAY_TASK_ID" not in os.environ:
        task -= int(os.environ["SLURM_ARRAY_TASK_MIN"])
    if not 0 <= task < num_tasks:
        raise ValueError(f"array task id {task} is outside [0, {num_tasks}); set DAS_ARRAY_TASKS "
                         f"and DAS_ARRAY_TASK_ID consistently")
    return RankInfo(task * local_world + local_rank, num_tasks * local_world, local_rank, dev)


def owned_units(num_units: int, info: RankInfo) -> list[int]:
    return list(range(info.rank, num_units, info.world))


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm preemption and --signal); checked between batches."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


class Preempted(RuntimeError):
    """Raised when a stop signal arrived; the current unit was dropped unmarked."""


def fault_point(name: str) -> None:
    """Test hook: ``DAS_FAULT=name:n`` sends SIGKILL to this process the n-th time it gets here."""
    spec = os.environ.get("DAS_FAULT")
    if not spec or not spec.startswith(name + ":"):
        return
    counter = f"_DAS_FAULT_COUNT_{name}"
    count = int(os.environ.get(counter, "0")) + 1
    os.environ[counter] = str(count)
    if count == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
