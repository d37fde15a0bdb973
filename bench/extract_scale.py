"""Cold extract at scale on one machine: img/s of `featpipe extract` (its --decoder auto) on N files, where each
stage's time goes, and where each thread spends it (stack samples).

    python bench/extract_scale.py [--images 20000] [--distinct 2000] [--sizes camera|small] [--device auto]
                                  [--repeats 2] [--workdir DIR] [--json OUT.json]   (bench/README.md has the runs)

The files: `--distinct` photos built as bench/throughput.py builds them (the shipped photos re-encoded, camera
sizes 0.3-1.9 MP, or `small`: 500 x 375, an ImageNet-like size), each written N / distinct times with its own JPEG
comment, so every file has its own content hash (nothing is deduplicated) and decodes like its source. They sit in
the page cache once written: this measures featpipe, not the disk.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import featpipe  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import torch

from featpipe.dataset import scan
from featpipe.extract import ExtractConfig, extract

sys.path.insert(0, str(Path(__file__).parent))
from throughput import SIZES, build_images, machine, med  # noqa: E402

SMALL = [(500, 375)]
IDLE = {("wait", "threading.py"), ("_worker", "thread.py")}  # a lock or a pool's empty queue: the thread is idle


def with_comment(data: bytes, note: bytes) -> bytes:
    """The same JPEG with a COM segment after SOI (and after JFIF's APP0 when there is one): other bytes, same
    pixels."""
    pos = 2 + (2 + int.from_bytes(data[4:6], "big") if data[2:4] == b"\xff\xe0" else 0)
    return data[:pos] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + data[pos:]


def build(work: Path, n: int, distinct: int, sizes: str) -> Path:
    src = build_images(work / f"distinct-{distinct}-{sizes}", distinct, SMALL if sizes == "small" else SIZES)
    dst = work / f"images-{n}-{distinct}-{sizes}"
    if (dst / ".complete").exists():
        return dst
    _root, files, _ = scan(src)

    def write(i: int) -> None:
        f = files[i % len(files)]
        (dst / f.label).mkdir(parents=True, exist_ok=True)
        (dst / f.label / f"{i:07d}.jpg").write_bytes(with_comment(Path(f.path).read_bytes(), b"copy %d" % i))

    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(write, range(n)))
    (dst / ".complete").touch()
    return dst


class Sampler:
    """Every thread's innermost Python frame, sampled every `period` seconds (sys._current_frames): where each
    thread's time goes, the reader pool's and the decoder's included, which cProfile (one thread) cannot show."""

    def __init__(self, period: float = 0.005) -> None:
        self.period, self.counts = period, collections.Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        names = {}
        while not self.stop.wait(self.period):
            for ident, frame in sys._current_frames().items():
                if ident == threading.get_ident():
                    continue
                if ident not in names:
                    t = next((t for t in threading.enumerate() if t.ident == ident), None)
                    names[ident] = re.sub(r"[-_]?\d+", "", t.name) if t else "?"
                code = frame.f_code
                where = (code.co_name, Path(code.co_filename).name)
                self.counts[(names[ident], "(waiting)" if where in IDLE else
                             f"{code.co_name} {where[1]}:{frame.f_lineno}")] += 1

    def top(self, k: int = 30) -> list[dict]:
        return [{"thread": t, "where": w, "seconds": round(c * self.period, 2)} for (t, w), c in
                self.counts.most_common(k)]


def run_once(images: Path, cache: Path, args, sample: bool, interval: float) -> dict:
    sys.setswitchinterval(interval)
    cfg = ExtractConfig(data_dir=images, backbone=args.backbone, cache_dir=cache, device=args.device)
    sampler = Sampler() if sample else None
    t = time.perf_counter()
    if sampler:
        with sampler:
            res = extract(cfg)
    else:
        res = extract(cfg)
    wall = time.perf_counter() - t
    assert res.computed + res.reused == res.images, (res.computed, res.images, res.skipped[:3])
    out = {"gil_interval": interval, "computed": res.computed, "seconds": round(res.seconds, 3),
           "wall": round(wall, 3), "img_s": round(res.images / res.seconds, 1), "decoder": res.decoder,
           "device": res.device, "stages": {k: round(v, 2) for k, v in res.stage_seconds.items()}}
    if sampler:
        out["samples"] = sampler.top()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--distinct", type=int, default=2000)
    p.add_argument("--sizes", choices=["camera", "small"], default="camera")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gil-intervals", default="0.005",
                   help="sys.setswitchinterval values to compare, interleaved in each repeat (Python's: 0.005)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="featpipe-scale-"))
    t = time.perf_counter()
    images = build(work, args.images, args.distinct, args.sizes)
    built = time.perf_counter() - t
    size = sum(f.stat().st_size for f in images.rglob("*.jpg"))
    intervals = [float(x) for x in args.gil_intervals.split(",")]
    # untimed: CUDA's start and first kernel choices (seconds on a GPU) fall on the distinct photos, not a timed run
    run_once(images.parent / f"distinct-{args.distinct}-{args.sizes}", Path(tempfile.mkdtemp(dir=work)), args, False,
             intervals[0])
    runs = [run_once(images, Path(tempfile.mkdtemp(prefix="cache-", dir=work)), args, r == args.repeats - 1, i)
            for r in range(args.repeats) for i in intervals]  # the last repeat sampled: its cost is not in others
    res = {"backbone": args.backbone, "images": args.images, "distinct": args.distinct, "sizes": args.sizes,
           "mean_kb": round(size / args.images / 1e3, 1), "build_seconds": round(built, 1),
           "img_s_median": {i: round(args.images / med([r["seconds"] for r in runs if r["gil_interval"] == i]), 1)
                            for i in intervals}, "runs": runs,
           "machine": {**machine(), "loadavg_end": os.getloadavg()},
           "cuda_max_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available()
           else None}
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
