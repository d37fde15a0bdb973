"""The cache at scale, on synthetic rows (no model): what adding, looking up and reading rows costs as the cache
grows to `--rows`, and what a warm run's file-index check and `cache compact` cost there.

At each level (0, 10 k, 100 k and --rows rows already cached) every operation runs in a fresh process (its peak
RSS is its own), the median of --repeats:
- add_1k: open the cache, journal 1,000 new rows in batches of 16 (the CPU engine's), publish them as a shard;
- lookup: open, read the cached hashes, test 1,000 cached and 1,000 unknown ones;
- read_1k: the embeddings of 1,000 random cached rows (what fit-head reads for its images);
- index_check: FileIndex.unchanged() for every file of a synthetic index of that many files, a window at a
  time as the engine looks them up, then save();
- compact: `featpipe cache compact` (merges the add probes' small shards).

    python bench/scale.py [--rows 1000000] [--dim 1280] [--repeats 3] [--workdir DIR] [--json OUT.json]
                          (bench/README.md has the last run)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featpipe.cache import Cache
from featpipe.shards import SHARD_ROWS, CacheKey
from featpipe.rows import Rows
from featpipe.cache_admin import compact
from featpipe.fileindex import FileIndex, Stamp
from featpipe.preprocess import Preprocessing
from run_info import machine  # (a sibling script: bench/ is on sys.path when one runs)

BATCH = 16


def key(dim: int) -> CacheKey:
    return CacheKey("synthetic", "0" * 64, Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3), dim, "fp32")


def rows(start: int, n: int, dim: int) -> Rows:
    ids = range(start, start + n)
    emb = np.random.default_rng(start).standard_normal((n, dim), np.float32)
    return Rows([f"{i:064x}" for i in ids], emb, [f"/data/c{i % 10}/{i}.jpg" for i in ids],
                [f"c{i % 10}" for i in ids])


def fill(cache_dir: Path, dim: int, upto: int) -> None:
    """Top the cache up to `upto` rows through the real write path, SHARD_ROWS at a time."""
    with Cache(cache_dir, key(dim)) as c:
        have = len(c.hashes())
        for start in range(have, upto, SHARD_ROWS):
            c.append(rows(start, min(SHARD_ROWS, upto - start), dim))
        c.publish()


def probe(name: str, cache_dir: Path, dim: int, level: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    t = time.perf_counter()
    if name == "add_1k":
        start = 10**12 + seed * 1000 + level  # hashes no level holds
        with Cache(cache_dir, key(dim)) as c:
            for s in range(0, 1000, BATCH):
                c.append(rows(start + s, min(BATCH, 1000 - s), dim))
            c.publish()
    elif name == "lookup":
        with Cache(cache_dir, key(dim)) as c:
            known = c.hashes()
            ask = [f"{i:064x}" for i in rng.integers(0, max(level, 1), 1000)] + \
                  [f"{i:064x}" for i in range(10**13, 10**13 + 1000)]
            hits = sum(h in known for h in ask)
            assert hits == (1000 if level else 0), hits
    elif name == "read_1k":
        c = Cache(cache_dir, key(dim))
        X = c.embeddings([f"{i:064x}" for i in rng.choice(level, 1000, replace=False)])
        assert X.shape == (1000, dim)
    elif name == "index_check":  # the scan's paths (the engine holds them too) are the filesystem's cost, not timed
        files = sorted((Path(f"/synthetic/{i // 1000}/{i}.jpg") for i in range(level)),
                       key=lambda p: (p.parent.name, p.name))  # in the scan's order, each spelled once (as it is)
        stats = {p: Stamp(1000 + int(p.stem), int(p.stem), int(p.stem), int(p.stem)) for p in files}
        for p in files:
            str(p)  # a Path keeps its string once spelled, as the scan's paths are
        t = time.perf_counter()
        index = FileIndex(cache_dir / "index", Path("/synthetic"), "bench", writable=True)
        hits = sum(index.unchanged(p, stats[p]) is not None for p in index.prefetching(files, lambda p: p))
        index.save()
        assert hits == level, hits
    elif name == "compact":
        compact(cache_dir)
    return {"seconds": time.perf_counter() - t, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM). Not getrusage's ru_maxrss: that keeps the parent's RSS from
    before the exec (the pages a fork shares count), which here is the driver's, holding a shard of rows."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def synthetic_index(cache_dir: Path, n: int) -> None:
    """An index of n files under /synthetic, as a cold run over them would have written it."""
    (cache_dir / "index").mkdir(parents=True, exist_ok=True)
    index = FileIndex(cache_dir / "index", Path("/synthetic"), "bench", writable=True)
    for i in range(n):
        index.record(Path(f"/synthetic/{i // 1000}/{i}.jpg"), Stamp(1000 + i, i, i, i), f"{i:064x}", 10**19)
    index.save()


def run_probe(name: str, cache_dir: Path, dim: int, level: int, seed: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe", name, "--workdir", str(cache_dir), "--dim", str(dim),
                          "--level", str(level), "--seed", str(seed)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def median_of(name: str, cache_dir: Path, dim: int, level: int, repeats: int) -> dict:
    runs = [run_probe(name, cache_dir, dim, level, s) for s in range(repeats)]
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in ("seconds", "peak_rss_mb")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the caches go (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--level", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.probe:
        print(json.dumps(probe(a.probe, Path(a.workdir), a.dim, a.level, a.seed)))
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="featpipe-scale-"))
    levels = sorted({lv for lv in (0, 10_000, 100_000) if lv < a.rows} | {a.rows})
    report: dict = {k: {} for k in ("add_1k_seconds", "add_1k_peak_rss_mb", "lookup_seconds", "lookup_peak_rss_mb",
                                    "read_1k_seconds", "index_check_seconds", "index_check_peak_rss_mb",
                                    "compact_seconds", "fill_seconds")}
    try:
        for level in levels:
            d = work / f"cache-{level}"
            t = time.perf_counter()
            fill(d, a.dim, level)
            synthetic_index(d, level)
            report["fill_seconds"][level] = round(time.perf_counter() - t, 1)
            add = median_of("add_1k", d, a.dim, level, a.repeats)
            look = median_of("lookup", d, a.dim, level, a.repeats)
            idx = median_of("index_check", d, a.dim, level, a.repeats)
            report["add_1k_seconds"][level], report["add_1k_peak_rss_mb"][level] = add["seconds"], add["peak_rss_mb"]
            report["lookup_seconds"][level], report["lookup_peak_rss_mb"][level] = look["seconds"], look["peak_rss_mb"]
            report["index_check_seconds"][level] = idx["seconds"]
            report["index_check_peak_rss_mb"][level] = idx["peak_rss_mb"]
            if level:
                report["read_1k_seconds"][level] = median_of("read_1k", d, a.dim, level, a.repeats)["seconds"]
            report["compact_seconds"][level] = run_probe("compact", d, a.dim, level, 0)["seconds"]
            print(f"{level:>9,} rows: add 1k {add['seconds']:.3f} s ({add['peak_rss_mb']:.0f} MiB peak), lookup "
                  f"{look['seconds']:.3f} s, read 1k {report['read_1k_seconds'].get(level, 0):.3f} s, index check "
                  f"{idx['seconds']:.2f} s, compact {report['compact_seconds'][level]:.2f} s", flush=True)
            if level != levels[-1]:
                shutil.rmtree(d)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    top, empty = levels[-1], levels[0]
    report["add_1k_ratio_top_vs_empty"] = round(report["add_1k_seconds"][top] / report["add_1k_seconds"][empty], 2)
    report["add_1k_rss_delta_mb"] = round(report["add_1k_peak_rss_mb"][top] - report["add_1k_peak_rss_mb"][empty], 1)
    report.update(rows=a.rows, dim=a.dim, repeats=a.repeats, machine=machine())
    print(f"add 1k at {top:,} vs empty: x{report['add_1k_ratio_top_vs_empty']}, "
          f"peak RSS {report['add_1k_rss_delta_mb']:+.0f} MiB")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
