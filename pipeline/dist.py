"""The one place that knows about ranks, devices, launchers and signals.

Rank plan (DESIGN.md section 3): under a Slurm job array each array task runs ``L`` local
processes (accelerate launch / torchrun); global rank = task_id * L + local_rank, world =
num_tasks * L. Unit u belongs to rank u mod world. No communication is needed.

Launchers: ``accelerate launch --multi_gpu --num_processes L`` and ``torchrun
--nproc_per_node L`` start L processes and set WORLD_SIZE / RANK; on a machine without CUDA
the accelerate state is created with ``cpu=True`` so that CPU processes are distinct ranks.
``accelerate launch --cpu --num_processes L`` starts ONE process (multi-CPU goes through MPI
there) and is refused with the fix, instead of silently running the whole plan L times.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import ConfigError

PREEMPT_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on request, run me again"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_MPI_WORLD_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _launcher_world() -> int:
    """Processes the launcher started on this node (1 without a launcher).

    Raises:
        ConfigError: the environment shows ``accelerate launch --cpu --num_processes N>1``.
    """
    env = os.environ
    mpi = [int(env[v]) for v in _MPI_WORLD_VARS if v in env]
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if mpi:
        return mpi[0]
    if env.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in env:
        raise ConfigError(
            "`accelerate launch --cpu --num_processes N` started a single process (accelerate runs "
            "several CPU processes only through mpirun), so N ranks would not exist; use "
            "`accelerate launch --multi_gpu --num_processes N` (CPU is detected) or `torchrun "
            "--nproc_per_node N` instead")
    return 1


def current(device: str | None = None) -> RankInfo:
    """This process's place in the run, from launcher and Slurm environment variables.

    Under a launcher (WORLD_SIZE > 1) accelerate's PartialState is created with ``cpu=True``
    when CUDA is absent: a plain ``Accelerator()`` would make every CPU process rank 0 of 1.
    ``DAS_ARRAY_TASKS`` / ``DAS_ARRAY_TASK_ID`` (set by the rendered sbatch scripts) take
    precedence over Slurm's own array variables.

    Raises:
        ConfigError: inconsistent launcher or array-task environment (message has the fix).
    """
    local_world = _launcher_world()
    local_rank = 0
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if local_world > 1:
        from accelerate import PartialState

        state = PartialState(cpu=not use_cuda)
        if state.num_processes != local_world:
            raise ConfigError(f"the launcher started {local_world} processes but accelerate sees "
                             f"{state.num_processes}; launch with `accelerate launch --multi_gpu` "
                             f"or `torchrun`, not a single-process launcher")
        local_rank = state.process_index
        dev = state.device
        exit_with_launcher()
    else:
        dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if device is not None and not device.startswith("cuda"):
        dev = torch.device(device)
    env = os.environ
    num_tasks = int(env.get("DAS_ARRAY_TASKS", env.get("SLURM_ARRAY_TASK_COUNT", "1")))
    task = int(env.get("DAS_ARRAY_TASK_ID", env.get("SLURM_ARRAY_TASK_ID", "0")))
    if "SLURM_ARRAY_TASK_MIN" in env and "DAS_ARRAY_TASK_ID" not in env:
        task -= int(env["SLURM_ARRAY_TASK_MIN"])
    if not 0 <= task < num_tasks:
        raise ConfigError(f"array task id {task} is outside [0, {num_tasks}); set DAS_ARRAY_TASKS "
                         f"and DAS_ARRAY_TASK_ID consistently")
    return RankInfo(task * local_world + local_rank, num_tasks * local_world, local_rank, dev)


def exit_with_launcher() -> None:
    """Ask the kernel for SIGTERM when the launcher (our parent) dies, so that a killed
    `torchrun` / `accelerate launch` never leaves orphaned workers behind (Linux; elsewhere a
    no-op). SIGTERM takes the usual path: the current unit is dropped, the worker exits 75."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def owned_units(num_units: int, info: RankInfo) -> list[int]:
    """The units rank ``info.rank`` of ``info.world`` extracts: u with u mod world == rank."""
    return list(range(info.rank, num_units, info.world))


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm preemption and --signal) and SIGINT (Ctrl-C); checked
    between batches, so the worker drops its current unit unmarked and exits cleanly.

    A second SIGINT stops at once (KeyboardInterrupt; the unit in progress is not marked, so
    nothing is lost either). Use as a context manager so that the previous handlers come back
    when the work ends.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopFlag:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.signum is not None:
                raise KeyboardInterrupt
            print("das: interrupted: stopping after the current batch (Ctrl-C again to stop now)",
                  file=sys.stderr, flush=True)
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


class Preempted(RuntimeError):
    """Raised when a stop signal arrived; the current unit was dropped unmarked."""


@contextmanager
def torch_threads(num: int):
    """Run a block with ``num`` intra-op threads, restoring the previous count afterwards
    (a worker that pins itself to 1 thread must not slow down the rest of its process)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
