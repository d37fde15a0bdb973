"""configure_cpu()'s allocator setting: freed batch-sized blocks are reused, not faulted in again from the kernel."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MiB tensor (a batch's activations) again and again; count page faults once warm.
CHILD = """
import resource, sys, torch
from featpipe.embed import configure_cpu
if sys.argv[1] == "tuned":
    configure_cpu()
def once():
    torch.ones(16 << 20)
for _ in range(10):  # the heap's layout settles within a few rounds
    once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(ctypes.util.find_library("c") != "libc.so.6", reason="glibc's mallopt")
def test_freed_batches_are_reused_instead_of_faulted_in_again():
    default, tuned = faults("default"), faults("tuned")
    assert default > 10 * 10_000  # glibc's default: each 64 MiB block comes back as ~16k fresh pages
    assert tuned < default / 4  # tuned: none once warm (a round or two may still grow the heap)
