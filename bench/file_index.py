"""A warm run's file-index check over N files, for one or more featpipe source trees side by side: the index as a
cold run over N synthetic files wrote it, then every file looked up unchanged (as the engine does: in the scan's
order, through prefetching() where the tree has it) and save(). Each check runs in a fresh process per tree and
repeat, alternating; reported: median seconds and the memory it added (VmHWM minus VmRSS before it began, after the
paths were listed, spelled and their stats taken, which the scan costs either way).

    python bench/file_index.py [--files 1000000] [--repeats 3] [--workdir DIR] [--json OUT.json] [TREE ...]

TREE: a checkout's root to import featpipe from (default: this one), e.g. a `git worktree` of an older commit.
(bench/README.md has the last run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def listed(n: int) -> list[Path]:
    return sorted((Path(f"/synthetic/{i // 1000}/{i}.jpg") for i in range(n)), key=lambda p: (p.parent.name, p.name))


def stamp(p: Path):
    from featpipe.fileindex import Stamp

    i = int(p.stem)
    return Stamp(1000 + i, i, i, i)


def build(index_dir: Path, n: int) -> None:
    from featpipe.fileindex import FileIndex

    index_dir.mkdir(parents=True, exist_ok=True)
    index = FileIndex(index_dir, None, "bench")
    for p in listed(n):
        index.record(p, stamp(p), f"{int(p.stem):064x}", 10**19)
    index.save()


def check(index_dir: Path, n: int) -> dict:
    import time

    from featpipe.fileindex import FileIndex

    files = listed(n)
    stats = {p: stamp(p) for p in files}
    for p in files:
        str(p)  # a Path keeps its string once spelled, as the scan's paths are: not the index's memory
    before = status_mib("VmRSS:")
    t = time.perf_counter()
    index = FileIndex(index_dir, Path("/synthetic"), "bench")
    order = index.prefetching(files, lambda p: p) if hasattr(index, "prefetching") else files
    hits = sum(index.unchanged(p, stats[p]) is not None for p in order)
    index.save()
    assert hits == n, hits
    return {"seconds": time.perf_counter() - t, "added_mib": status_mib("VmHWM:") - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trees", nargs="*", default=[str(REPO)])
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="where the index goes (default: a temp dir, removed after)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--check", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.check:
        print(json.dumps(check(Path(a.check), a.files)))
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="featpipe-index-"))
    if not (work / "files.sqlite").exists():
        build(work, a.files)
    runs: dict[str, list[dict]] = {t: [] for t in a.trees}
    for _ in range(a.repeats):
        for tree in a.trees:
            out = subprocess.run([sys.executable, __file__, "--check", str(work), "--files", str(a.files)],
                                 env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True, check=True)
            runs[tree].append(json.loads(out.stdout))
    medians = {t: {k: round(statistics.median(r[k] for r in rs), 2) for k in ("seconds", "added_mib")}
               for t, rs in runs.items()}
    report = {"files": a.files, "repeats": a.repeats, "trees": medians}
    for t, r in report["trees"].items():
        print(f"{t}: {r['seconds']:.2f} s, +{r['added_mib']:.1f} MiB ({a.files:,} files)")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    if not a.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
