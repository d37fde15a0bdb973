"""What this machine offers, found without importing torch (a fully cached run should not pay for it)."""

from __future__ import annotations

import os


def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls run natively (x3-4 over fp32 here); elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def may_have_gpu() -> bool:
    """False when no NVIDIA device can be visible; True means only that torch must be asked."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


def available_memory() -> int | None:
    """Bytes this process could still get without swapping: the kernel's MemAvailable, and in a container (cgroup
    v2) no more than its limit minus its use; None where neither says."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            line = next((line for line in f if line.startswith("MemAvailable:")), "")
        found += [int(line.split()[1]) * 1024] if line else []
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as lim, open("/sys/fs/cgroup/memory.current") as cur:
            limit = lim.read().strip()
            found += [int(limit) - int(cur.read())] if limit != "max" else []
    except (OSError, ValueError):
        pass
    return min(found) if found else None
