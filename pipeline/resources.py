"""What a step cost the machine: the peak host memory (RSS) and peak GPU memory while it ran.

The step loop resets both peaks before each step and records them in the step's manifest, so every
artifact says what building it took on the machine that built it (benchmarks/checks/scale.py reads
them). Linux keeps the process's peak RSS as VmHWM; writing 5 to /proc/self/clear_refs restarts it
from the current RSS. Where that is not possible the figure is the peak since the process started,
and the manifest says so.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def reset_peaks() -> bool:
    """Restart the peak RSS (and CUDA's peak allocation) from now; False where the RSS peak cannot be reset."""
    torch = sys.modules.get("torch")  # never imports torch for a step that did not
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peaks(reset: bool) -> dict:
    """Peak RSS and current RSS in MB (and peak GPU memory where torch used CUDA); `reset` says whether the
    peak was restarted at the step's start (else it counts from the process's start)."""
    out: dict = {}
    try:
        fields = dict(line.split(":", 1) for line in _STATUS.read_text().splitlines() if ":" in line)
        out["peak_rss_mb"] = round(int(fields["VmHWM"].split()[0]) / 1024, 1)
        out["rss_mb"] = round(int(fields["VmRSS"].split()[0]) / 1024, 1)
    except (OSError, KeyError, ValueError):
        import resource

        out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        reset = False
    out["peak_since"] = "step" if reset else "process"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so the next
    phase of a step starts from what is alive, not from the last phase's high-water mark."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the allocator keeps its pages, nothing is wrong
