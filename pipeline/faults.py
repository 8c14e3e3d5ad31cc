"""Test hook: kill this process at a named point, to prove that no kill loses or mixes data.

``DAS_FAULT=name:n`` sends SIGKILL to the process the n-th time it reaches ``fault_point(name)``;
with ``DAS_FAULT_TASK=i`` only the processes of array task i (``DAS_ARRAY_TASK_ID``) are hit.
Unset, a fault point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

# In the order one unit passes them.
FAULT_POINTS = ("claim", "after_cache", "batch", "before_write", "mid_write", "before_marker",
                "after_unit", "partial")


def fault_point(name: str) -> None:
    """SIGKILL this process here if ``DAS_FAULT`` says so (see the module docstring)."""
    spec = os.environ.get("DAS_FAULT")
    if not spec or not spec.startswith(name + ":"):
        return
    task = os.environ.get("DAS_FAULT_TASK")
    if task is not None and task != os.environ.get("DAS_ARRAY_TASK_ID"):
        return
    assert name in FAULT_POINTS, name
    counter = f"_DAS_FAULT_COUNT_{name}"
    count = int(os.environ.get(counter, "0")) + 1
    os.environ[counter] = str(count)
    if count == int(spec.split(":", 1)[1]):
        os.kill(os.getpid(), signal.SIGKILL)
