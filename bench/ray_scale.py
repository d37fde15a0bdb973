"""Local vs Ray engine on the same images, and how much the Ray driver reads.

    python bench/ray_scale.py [--images 1000] [--workers 2] [--shards N] [--workdir DIR] [--json OUT.json]

Builds the bench image set (throughput.build_images: the shipped photos re-encoded at camera sizes), then runs
`featpipe extract` as a user would, each in its own process and with a new cache: the local engine, then
`--engine ray` with a local Ray the driver starts, then `--engine ray --ray-address` on a Ray head started here
(its processes are not the driver's children, so the driver's /proc/<pid>/io counts only the
driver). Each run's driver process reports its rchar (bytes it read: files and sockets, imports and the weights
file's hash included) from /proc/<pid>/io, polled until it exits; on the cluster the Ray extract also runs on the
first 20 images alone: what the driver reads whatever the number of images. (For a local Ray, the kernel adds the
reads of the Ray processes the driver reaps to its own: that figure is not the driver's alone.) `--shards N`: the
same images as N WebDataset shards too (cls labels), extracted by the local engine and on the cluster.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import build_images  # noqa: E402

ARGS = ("--decoder", "pil", "--device", "cpu")


def run(args: list[str], env: dict | None = None) -> dict:
    """One `featpipe extract ... --json` process: its result, wall seconds, and its rchar (the last reading before
    it exited, polled every 50 ms)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "featpipe", "extract", *args, *ARGS, "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    readings = []
    while proc.poll() is None:
        try:
            readings.append(int(dict(line.split(": ") for line in open(f"/proc/{proc.pid}/io").read()
                                     .splitlines())["rchar"]))
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"featpipe extract {' '.join(args)} failed:\n{err[-3000:]}")
    res = json.loads(out)
    return {"seconds": round(time.perf_counter() - t0, 2), "images_per_sec": res["images_per_sec"],
            "computed": res["computed"], "rchar_driver": readings[-1] if readings else 0,
            "stage_seconds": res["stage_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=0, help="also as this many WebDataset shards")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="fp-rs-", dir="/tmp"))
    data = build_images(work / f"images-{a.images}", a.images)
    total = sum(p.stat().st_size for p in data.rglob("*.jpg"))
    out = {"images": a.images, "image_bytes": total, "workers": a.workers}
    out["local"] = run([str(data), "--cache-dir", str(_fresh(work / "c-local"))])
    out["ray_local"] = run([str(data), "--cache-dir", str(_fresh(work / "c-ray")), "--engine", "ray",
                            "--workers", str(a.workers)])
    out["ray_cluster"] = on_cluster(str(data), work, a.workers, _first(data, work / "images-20", 20))
    for k in ("local", "ray_local", "ray_cluster"):
        out[k]["rchar_share_of_images"] = round(out[k]["rchar_driver"] / total, 4)
    if a.shards:
        pattern = as_shards(data, work / f"shards-{a.images}-{a.shards}", a.shards)
        out["shards"] = {"count": a.shards, "local": run([pattern, "--cache-dir", str(_fresh(work / "s-local"))]),
                         "ray_cluster": on_cluster(pattern, work, a.workers, None)}
        for k in ("local", "ray_cluster"):
            out["shards"][k]["rchar_share_of_images"] = round(out["shards"][k]["rchar_driver"] / total, 4)
    print(json.dumps(out, indent=1))
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


def on_cluster(data: str, work: Path, workers: int, few: Path | None) -> dict:
    """The Ray extract joining a one-node cluster started here (ray.cluster_utils.Cluster, like `ray start --head`;
    stopped by its own process ids, never `ray stop`, which would stop every Ray on the machine); first on `few`
    images, when given."""
    from ray.cluster_utils import Cluster

    tmp = Path(tempfile.mkdtemp(prefix="fp-rh-", dir="/tmp"))
    (tmp / "ray").mkdir()
    os.environ["RAY_TMPDIR"] = str(tmp)  # the head notes its address there, not in the machine's /tmp/ray
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": workers, "include_dashboard": False,
                                                            "temp_dir": str(tmp),
                                                            "object_store_memory": 200 * 2**20})
    try:
        out = {}
        if few is not None:
            out["rchar_driver_20_images"] = run([str(few), "--cache-dir", str(_fresh(work / "c-cluster-20")),
                                                 "--engine", "ray", "--ray-address", cluster.address, "--workers",
                                                 str(workers)])["rchar_driver"]
        return {**run([data, "--cache-dir", str(_fresh(work / "c-cluster")), "--engine", "ray", "--ray-address",
                       cluster.address, "--workers", str(workers)]), **out}
    finally:
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _first(data: Path, dst: Path, n: int) -> Path:
    """The first n images of the set, copied in its class folders."""
    shutil.rmtree(dst, ignore_errors=True)
    for p in sorted(data.rglob("*.jpg"))[:n]:
        (dst / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst / p.parent.name / p.name)
    return dst


def as_shards(data: Path, dst: Path, n: int) -> str:
    """The set's images as n .tar shards (sorted order, a cls member each); returns their brace pattern."""
    files = sorted(data.rglob("*.jpg"))
    _fresh(dst).mkdir(parents=True)
    per = -(-len(files) // n)
    for k in range(n):
        with tarfile.open(dst / f"s-{k:06d}.tar", "w") as tar:
            for i, f in enumerate(files[k * per:(k + 1) * per], k * per):
                tar.add(f, arcname=f"{i:07d}.jpg")
                label = f.parent.name.encode()
                info = tarfile.TarInfo(f"{i:07d}.cls")
                info.size = len(label)
                tar.addfile(info, io.BytesIO(label))
    return str(dst / f"s-{{{0:06d}..{n - 1:06d}}}.tar")


def _fresh(d: Path) -> Path:
    shutil.rmtree(d, ignore_errors=True)
    return d


if __name__ == "__main__":
    main()
