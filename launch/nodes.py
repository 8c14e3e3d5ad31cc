"""Will any node run this? `das submit` checks one task's request against what `sinfo` lists.

Both rendered jobs run one task on one node, so some node of the partition must offer the
task's CPUs, GPUs (gres gpu, all types counted) and memory. A task that no node can run would
pend forever (reason PartitionConfig) without a word, so such a request is refused before
anything is submitted. The default CPUs per process shrink to what the nodes offer, with a note;
a value the user gave is never changed, only refused (launch/README.md).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from .slurm import Plan

DEFAULT_CPUS_PER_PROCESS = 4
SINFO = ["sinfo", "-h", "-N", "--all", "-o", "%N|%c|%m|%G|%P"]


@dataclass(frozen=True)
class Node:
    """One line of ``sinfo -N``: a node as a member of one partition."""

    name: str
    partition: str
    """Partition name, without sinfo's default marker."""
    default: bool
    """The partition is the cluster's default (``*`` after its name)."""
    cpus: int
    mem_mb: int
    """Configured memory (RealMemory) in MB."""
    gpus: int
    """GPUs in the node's gres, all types together."""


def gres_gpus(gres: str) -> int:
    """GPUs in a sinfo ``%G`` string: ``(null)`` -> 0, ``gpu:8``, ``gpu:h100:8(S:0-1)`` -> 8,
    ``gpu:a100:2(S:0,1),gpu:v100:1,mps:200`` -> 3 (types summed, other gres ignored)."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):  # commas outside (S:0,1)
        fields = item.split("(")[0].strip().split(":")
        if fields[0] != "gpu":
            continue
        count = re.fullmatch(r"(\d+)([KMG]?)", fields[-1]) if len(fields) > 1 else None
        total += int(count[1]) * 1024 ** " KMG".index(count[2] or " ") if count else 1
    return total


def parse_sinfo(text: str) -> list[Node]:
    """Nodes from the output of ``SINFO`` (``%N|%c|%m|%G|%P``, one node and partition a line;
    ``+`` after a figure is dropped). Lines without whole numbers of CPUs and MB are skipped."""
    nodes = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 5 or not fields[1].rstrip("+").isdigit() or not fields[2].rstrip("+").isdigit():
            continue
        name, cpus, mem, gres, part = fields
        nodes.append(Node(name=name, partition=part.rstrip("*"), default=part.endswith("*"),
                          cpus=int(cpus.rstrip("+")), mem_mb=int(mem.rstrip("+")), gpus=gres_gpus(gres)))
    return nodes


def _sbatch_option(options: tuple[str, ...], name: str) -> tuple[str, str] | None:
    """The last ``--name=value`` (or ``--name value``) of the extra #SBATCH options, as
    (how the user wrote it, value): sbatch honours the last of repeated directives."""
    found = None
    for opt in options:
        m = re.fullmatch(rf"--{name}(?:=|\s+)(\S+)", opt.strip())
        if m:
            found = (f"--sbatch-option={opt}", m[1])
    return found


def _mem_mb(shown: str, value: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)B?", value, re.IGNORECASE)
    if m is None:
        raise ConfigError(f"{shown}: {value!r} is not a Slurm memory size; use e.g. 64G or 4000M")
    return -(-int(m[1]) * 1024 ** "KMGT".index(m[2].upper() or "M") // 1024)  # MB, rounded up


def _n(count: int, what: str) -> str:
    return f"{count} {what}" + "s" * (count != 1)


def fit_to_nodes(plan: Plan, nodes: list[Node], cpus_given: bool) -> tuple[Plan, list[str]]:
    """Check one task's request against the nodes of the plan's partition (or the default one).

    Both jobs run one task on one node, so a single node must offer the task's CPUs, GPUs
    (gres gpu) and memory (--mem, --mem-per-cpu or --mem-per-gpu among the --sbatch-option's).
    A request given explicitly is never changed; the default CPUs (DEFAULT_CPUS_PER_PROCESS
    per process) are lowered to the most that a node meeting the rest of the request has.
    Returns the plan (cpus_per_task possibly lowered) and lines to show ("note: ...",
    "warning: ..."). Raises ConfigError naming the option, the value, what the largest node
    offers and the fix.
    """
    shown_part, partition = f"--partition {plan.partition}", plan.partition
    if (given := _sbatch_option(plan.sbatch_options, "partition")) is not None:
        shown_part, partition = given  # rendered after --partition
    if partition is None:
        pool = [n for n in nodes if n.default]
        if not pool:
            return plan, ["warning: sinfo shows no default partition: the request is not checked "
                          "against the nodes (give --partition to check it)"]
        where = f"the default partition {pool[0].partition!r}"
    else:
        names = partition.split(",")  # sbatch takes a list: the first that can start it
        known = {n.partition for n in nodes}
        for name in names:
            if name not in known:
                listed = ", ".join(sorted({n.partition + "*" * n.default for n in nodes}))
                raise ConfigError(f"{shown_part}: sinfo lists no partition {name!r} (it lists "
                                 f"{listed}; * = the default); choose one of them")
        pool = [n for n in nodes if n.partition in names]
        where = f"partition {partition!r}"

    gpus, cpus = plan.gpus_per_task, plan.cpus_per_task
    if gpus:
        most = max(pool, key=lambda n: n.gpus)
        if most.gpus < gpus:
            fix = (f"use --gpus-per-task {most.gpus} or fewer (and more --array-tasks for as many "
                   f"ranks), or another --partition" if most.gpus else
                   "use --gpus-per-task 0 (CPU processes) or a partition with GPUs (--partition)")
            raise ConfigError(f"--gpus-per-task {gpus}: no node of {where} has {_n(gpus, 'GPU')} (the "
                             f"most on one node: {most.gpus}, on {most.name}); {fix}")
    if cpus_given:
        big = max(pool, key=lambda n: n.cpus)
        if big.cpus < cpus:
            raise ConfigError(f"--cpus-per-task {cpus}: no node of {where} has {_n(cpus, 'CPU')} (the "
                             f"largest has {big.cpus}: {big.name}); ask for at most "
                             f"--cpus-per-task {big.cpus}, or choose another --partition")
    mem = None
    for kind in ("mem", "mem-per-cpu", "mem-per-gpu"):  # sbatch allows only one of them
        if (given := _sbatch_option(plan.sbatch_options, kind)) is not None:
            mem = (kind, given[0], _mem_mb(given[0], given[1]))

    def need_mb(num_cpus: int) -> int:
        if mem is None:
            return 0
        kind, _, per = mem
        return per * {"mem": 1, "mem-per-cpu": num_cpus, "mem-per-gpu": gpus}[kind]

    if mem is not None:
        big = max(pool, key=lambda n: n.mem_mb)
        least = need_mb(cpus if cpus_given else 1)
        if big.mem_mb < least:
            raise ConfigError(f"{mem[1]}: a task needs {least} MB, and no node of {where} has that "
                             f"much memory (the largest has {big.mem_mb} MB: {big.name}); ask "
                             f"for less, or choose another --partition")

    def task_cpus(node: Node) -> int:
        return cpus if cpus_given else min(cpus, node.cpus)

    fits = [task_cpus(n) for n in pool
            if n.cpus >= task_cpus(n) and n.gpus >= gpus and n.mem_mb >= need_mb(task_cpus(n))]
    if not fits:
        asked = [f"--cpus-per-task {cpus}"] * cpus_given + [f"--gpus-per-task {gpus}"] * (gpus > 0)
        asked += [mem[1]] if mem else []
        shapes = sorted({(n.cpus, n.gpus, n.mem_mb) for n in pool}, reverse=True)[:4]
        offered = "; ".join(f"{_n(c, 'CPU')}, {_n(g, 'GPU')}, {m} MB" for c, g, m in shapes)
        raise ConfigError(f"{' with '.join(asked)}: no single node of {where} offers all of it "
                         f"(its nodes have: {offered}); lower one of them, or choose another "
                         f"--partition")
    if cpus_given or max(fits) == cpus:
        return plan, []
    best = max(fits)
    return dataclasses.replace(plan, cpus_per_task=best), [
        f"note: --cpus-per-task {best}: the default, {DEFAULT_CPUS_PER_PROCESS} per process "
        f"({cpus}), is more than any node of {where} that fits the request has; pass "
        f"--cpus-per-task to choose"]


def check_against_cluster(plan: Plan, cpus_given: bool) -> Plan:
    """``fit_to_nodes`` with the nodes ``sinfo`` lists; its lines go to stderr. Without sinfo
    (or when it fails) the request is not checked, and a warning says so."""
    unchecked = ("the request is not checked against the nodes (a task that no node can run "
                 "would pend forever)")
    lines: list[str]
    if shutil.which(SINFO[0]) is None:
        lines = [f"warning: `sinfo` is not on PATH: {unchecked}"]
    else:
        try:
            done = subprocess.run(SINFO, capture_output=True, text=True, timeout=60)
            nodes = parse_sinfo(done.stdout) if done.returncode == 0 else []
            why = (done.stderr.strip().splitlines() or ["it lists no nodes"])[-1]
        except subprocess.TimeoutExpired:
            nodes, why = [], "no answer in 60 s"
        if nodes:
            plan, lines = fit_to_nodes(plan, nodes, cpus_given)
        else:
            lines = [f"warning: `{shlex.join(SINFO)}` failed ({why}): {unchecked}"]
    for line in lines:
        print(f"das submit: {line}", file=sys.stderr)
    return plan
