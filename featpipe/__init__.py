"""featpipe: cached frozen-backbone embeddings, heads in seconds, and the experiment that proves it."""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while they wait lose whole time slices whenever a core is shared (our own decode threads,
# other processes): forward passes ran several times slower on a busy 2-core machine (bench/README.md). Set before
# torch loads its OpenMP runtime (every featpipe entry point imports this package first); the user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
