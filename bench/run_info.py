"""What a bench's JSON says of the run: the machine, the commit and the load (one copy for the benches that
import no torch; throughput.py adds torch's and DALI's versions to its own)."""

from __future__ import annotations

import os
import platform
import subprocess
import time


def machine() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"cpu": platform.processor() or platform.machine(), "cores_usable": len(os.sched_getaffinity(0)),
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"), "loadavg": os.getloadavg()}
