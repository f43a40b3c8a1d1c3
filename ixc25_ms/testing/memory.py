"""Host memory probes (Linux /proc): current and peak RSS, resetting the peak, heap release, memory bandwidth."""
from __future__ import annotations

import gc
import resource
import time

import numpy as np


def vm(field: str) -> float:
    """VmRSS / VmHWM (any /proc/self/status field in kB) of this process in MiB; the getrusage peak elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return peak_rss_mb()


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (writes 5 to /proc/self/clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB since it started (getrusage; not affected by reset_peak)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def release_host_memory() -> None:
    """gc, then hand freed heap pages back to the OS (glibc malloc_trim; a no-op elsewhere)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Best of `repeats` numpy copies of an `mb` MiB array: (bytes read + bytes written) / s."""
    src = np.ones(mb * (1 << 20) // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best
