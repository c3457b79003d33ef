"""How many CPUs this process should use.

In a Kubernetes pod `os.cpu_count()` is the node's count (say 96) while the pod requested 4:
one decode process per node CPU would thrash. The pipeline passes each task's CPU request
in FERFLOW_CPUS; elsewhere the CPUs this process may run on are the answer.
"""

from __future__ import annotations

import math
import os

CPUS_ENV = "FERFLOW_CPUS"


def parse_cpu_quantity(text: str) -> float:
    """A Kubernetes CPU quantity ("4", "2.5", "500m") as a number of CPUs."""
    text = str(text).strip()
    try:
        return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a CPU quantity (e.g. 4, 2.5 or 500m)") from None


def available_cpus() -> int:
    """FERFLOW_CPUS (rounded down, at least 1), else the CPUs this process may run on."""
    text = os.environ.get(CPUS_ENV, "").strip()
    if text:
        try:
            return max(1, math.floor(parse_cpu_quantity(text)))
        except ValueError:
            pass  # a bad value must not stop the task; fall back to the affinity mask
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS
        return os.cpu_count() or 1
