"""`featpipe extract --engine ray`: the compute stage (pipeline.Compute) on a pool of Ray actors.

The driver (engine.Engine) keeps its reader (read once, sha256, probe, cache lookup) and its single writer thread
(Cache.append per batch, a shard published at the end); only the compute stage differs: instead of decoding and
running the model in-process, it ships each batch of missing images' bytes to the least busy actor and yields
(embedding, skip reason) results as they finish. Actors build model and decoder with `runtime.start_embedding`.

Why actors driven by hand rather than Ray Data's `from_items(...).map_batches(cls, concurrency=N)`: Ray Data wants
the whole input up front (from_items puts every record in the object store before the first batch runs), while
here the reader streams: reading, hashing and probing overlap compute, and only `2 x workers` batches of bytes are
ever in flight, so driver memory and the object store stay a few batches deep on any dataset size. Ray Data's
streaming executor also costs extra processes and seconds of start-up that a 2-core machine feels. What Ray Data
would add (retries of a dead worker) comes from actor options: `max_restarts` + `max_task_retries` re-run a batch
whose actor died on the restarted actor, which reloads the model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from featpipe.decode import Probe
from featpipe.errors import UserError
from featpipe.pipeline import DONE, Computed, StageTimer
from featpipe.runtime import embed_decoded, start_embedding

OBJECT_STORE_BYTES = 200 * 2**20  # a local Ray holds only a few batches of encoded images at a time
RETRIES = 3  # restarts of a dead actor, and re-runs of the batch it was working on
IN_FLIGHT_PER_WORKER = 2  # one computing, one queued: an actor never waits for the driver's round trip
REAP_SECONDS = 3  # after ray.shutdown(): how long a local Ray's leftover agents and workers get to exit on SIGTERM
DIE_ONCE_ENV = "FEATPIPE_RAY_DIE_ONCE"  # test hook, see _die_once
# The AF_UNIX path limit (107 bytes) minus the longest socket path Ray puts under its temp dir (pids up to 7 digits).
# 60 was 2-4 bytes short: a cache dir under /tmp/pytest-of-root/pytest-128/ broke ray.init.
RAY_SOCKET_SUFFIX = "/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store"
_SOCKET_PATH_ROOM = 107 - len(RAY_SOCKET_SUFFIX)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install featpipe[ray]") from None
    return ray


class EmbedWorker:
    """One Ray actor: model and decoder built once (actor start), then embeds batches of encoded bytes."""

    def __init__(self, cfg, spec, die_once: str | None) -> None:
        import ray
        import torch

        self.timer = StageTimer()
        self.embedder, self.decoder = start_embedding(cfg, spec, self.timer)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if self.embedder.device.type == "cpu" and cpus:
            torch.set_num_threads(max(1, int(cpus)))  # start_embedding sized threads for the whole machine
        self.die_once = die_once

    def describe(self) -> tuple[str, str, str, dict]:
        return self.decoder.name, str(self.embedder.device), self.embedder.precision, self.timer.totals()

    def embed(self, data: list[bytes], probes: list[Probe]) -> tuple[np.ndarray | None, list[str | None], dict]:
        """(embeddings of the decodable images, per-image skip reason or None, this batch's stage seconds)."""
        _die_once(self.die_once)
        timer = StageTimer()
        with timer("decode"):
            pixels, reasons = self.decoder.decode(data, probes)
        return embed_decoded(self.embedder, pixels, reasons, timer), reasons, timer.totals()


def _die_once(marker: str | None) -> None:
    """Test hook ($FEATPIPE_RAY_DIE_ONCE=<marker path>): the first actor to create the marker exits abruptly, as an
    OOM-killed or crashed worker would; the marker then keeps its restarted self and its peers alive."""
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


class RayCompute:
    """Ray starts (or is joined) on the first batch that needs compute, so a fully cached run never touches Ray."""

    def __init__(self, cfg, spec, timer: StageTimer):  # cfg: ExtractConfig
        self.cfg, self.spec, self.timer = cfg, spec, timer
        self.ray = _import_ray()
        if cfg.workers and not cfg.ray_address:  # now, not after the tens of seconds a local Ray takes to start
            _check_workers(cfg.workers, local_cpus(), None, gpu=False, where="this machine (a local Ray)")
        self.batch_size = cfg.batch_size or 32
        self.actors: list = []
        self.in_flight: dict = {}  # ObjectRef -> (items, actor)
        self._described = ("none", "none", "none")
        self.started_ray = False
        self.ray_children: list = []  # the processes ray.init started here (gcs, raylet, ...), see _shutdown
        self.released = threading.Event()  # set once a local Ray is shut down: its owner thread may end

    def described(self) -> tuple[str, str, str]:
        return self._described

    def run(self, encoded: queue.Queue) -> Iterator[Computed]:
        """Keep every actor busy with batches from the reader, yield results as they finish. Ray's driver thread
        prints raylet events ("worker died, retrying") to stdout, which `--json` reserves for its one object, so
        they go to stderr until Ray is shut down."""
        with contextlib.redirect_stdout(sys.stderr):
            try:
                eof = False
                while not eof or self.in_flight:
                    room = not eof and len(self.in_flight) < IN_FLIGHT_PER_WORKER * max(1, len(self.actors))
                    if room:
                        eof, settled = self._submit_next(encoded)
                        if settled:
                            yield Computed([], None, [], settled)
                    if self.in_flight:
                        yield from self._collect(block=not room)
            finally:
                if self.started_ray:
                    self._shutdown()
                self.released.set()

    def _shutdown(self) -> None:
        """ray.shutdown() gives the raylet one second to stop its agents and workers before SIGKILL; on a busy
        machine that is too short and they linger, orphaned, for a minute or two. Whatever is left is stopped here."""
        procs = _with_descendants(self.ray_children)  # listed now: once the raylet is gone, its workers are orphans
        try:
            self.ray.shutdown(wait_for_processes=True)
        except TypeError:  # Ray before 2.5x has no wait_for_processes: stop_processes() below covers it
            self.ray.shutdown()
        stop_processes(procs)

    def _init_local_ray(self, **kw) -> None:
        """ray.init on a thread that lives until the run ends: Ray's own processes get SIGKILL when the thread that
        started them ends (PR_SET_PDEATHSIG), and the decode thread that asks for Ray ends before the run does."""
        started, failed = threading.Event(), []

        def own() -> None:
            before = {p.pid for p in _children()}
            try:
                self.ray.init(**kw)
                self.ray_children = [p for p in _children() if p.pid not in before]
            except BaseException as e:  # re-raised in the caller's thread
                failed.append(e)
            started.set()
            self.released.wait()

        threading.Thread(target=own, name="ray-owner", daemon=True).start()
        started.wait()
        if failed:
            raise failed[0]

    def _submit_next(self, encoded: queue.Queue) -> tuple[bool, int]:
        """Take one reader message (waiting briefly if results are due) and send its images to the least busy
        actor; returns (reader done, the files it settled without compute, if any)."""
        try:
            enc = encoded.get(timeout=0.02 if self.in_flight else None)
        except queue.Empty:
            return False, 0
        if enc is DONE:
            return True, 0
        if enc.items:
            if not self.actors:
                self._start_actors()
            actor = min(self.actors, key=lambda a: sum(b is a for _, b in self.in_flight.values()))
            ref = actor.embed.remote([it.data for it in enc.items], [it.probe for it in enc.items])
            self.in_flight[ref] = (enc.items, actor)
        return False, enc.settled

    def _collect(self, block: bool) -> Iterator[Computed]:
        ready, _ = self.ray.wait(list(self.in_flight), num_returns=1, timeout=None if block else 0)
        for ref in ready:
            items, _actor = self.in_flight.pop(ref)
            emb, reasons, seconds = self.ray.get(ref)
            # ray.get maps large arrays zero-copy from the object store; such a view must not outlive
            # ray.shutdown() (releasing it then kills the driver), so the rows get their own copy.
            emb = None if emb is None else np.array(emb)
            for stage, s in seconds.items():
                self.timer.add(stage, s)
            yield Computed(items, emb, reasons, 0)

    def _start_actors(self) -> None:
        ray = self.ray
        with self.timer("ray_start"):
            self._connect()
            gpu = self.cfg.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
            if self.cfg.device == "cuda" and not gpu:
                raise UserError("--device cuda requested but the Ray cluster has no GPU")
            n = self._worker_count(gpu)
            cls = ray.remote(EmbedWorker).options(num_cpus=1, num_gpus=1 if gpu else 0, max_restarts=RETRIES,
                                                  max_task_retries=RETRIES)
            self.actors = [cls.remote(self.cfg, self.spec, os.environ.get(DIE_ONCE_ENV)) for _ in range(n)]
            try:
                described = ray.get([a.describe.remote() for a in self.actors])
            except ray.exceptions.RayError as e:
                raise UserError(f"Ray workers failed to start: {str(e).strip().splitlines()[-1]}") from None
        self._described = tuple(",".join(sorted({d[i] for d in described})) for i in range(3))
        self.timer.add("load_model", max(d[3].get("load_model", 0.0) for d in described))

    def _worker_count(self, gpu: bool) -> int:
        """--workers, else one actor per GPU (or CPU); more than the cluster can place would wait forever."""
        res = self.ray.cluster_resources()
        cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
        n = self.cfg.workers or max(1, min(cpus, gpus) if gpu else cpus)
        _check_workers(n, cpus, gpus, gpu, where="the Ray cluster")
        return n

    def _connect(self) -> None:
        """Join --ray-address, or start a small local Ray (shut down after the run); reuse one already running."""
        ray = self.ray
        if ray.is_initialized():
            return
        quiet = {"log_to_driver": False, "logging_level": logging.ERROR}
        if self.cfg.ray_address:
            _check_reachable(self.cfg.ray_address)
            try:
                ray.init(address=self.cfg.ray_address, **quiet)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(f"cannot join the Ray cluster at {self.cfg.ray_address}: {e}") from None
        else:
            self._init_local_ray(num_cpus=local_cpus(), object_store_memory=OBJECT_STORE_BYTES,
                                 include_dashboard=False, _temp_dir=str(ray_temp_dir(self.cfg.cache_dir)), **quiet)
        self.started_ray = True


def local_cpus() -> int:
    """The CPUs a local Ray gets: the ones this process may run on (a container's or taskset's share)."""
    return len(os.sched_getaffinity(0))


def _check_workers(n: int, cpus: int, gpus: int | None, gpu: bool, where: str) -> None:
    """Every actor takes one CPU (and one GPU on a GPU cluster): more than fit would wait forever for a slot."""
    fit = min(cpus, gpus or 0) if gpu else cpus
    if n > fit:
        have = f"{cpus} CPUs" + ("" if gpus is None else f" and {gpus} GPUs")
        each = "one CPU and one GPU" if gpu else "one CPU"
        raise UserError(f"--workers {n} is more than {where} can run: it has {have}, and each worker needs {each}")


def _children() -> list:
    """This process's direct children (psutil: a Ray dependency, vendored in ray/thirdparty_files)."""
    import psutil

    return psutil.Process().children()


def _with_descendants(procs: list) -> list:
    """procs and everything they started (the raylet's agents and workers), as far as still running."""
    import psutil

    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out += [p, *p.children(recursive=True)]
    return out


def stop_processes(procs: list, grace: float = REAP_SECONDS) -> None:
    """SIGTERM what is still running, SIGKILL what ignores it for `grace` seconds. psutil checks each pid still
    belongs to the process it was when listed, so a reused pid is never signalled."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _check_reachable(address: str) -> None:
    """ray.init retries an unreachable head for minutes; a plain HOST:PORT that refuses a TCP connection fails now."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", "ray://…": left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray head at {address}: {e.strerror or e}") from None


def ray_temp_dir(cache_dir: Path) -> Path:
    """`<cache dir>/.ray` (session logs next to the cache), or a short /tmp dir when that path would push Ray's
    unix sockets past the AF_UNIX path limit."""
    d = Path(cache_dir).resolve() / ".ray"
    if len(str(d)) > _SOCKET_PATH_ROOM:
        d = Path("/tmp") / f"featpipe-ray-{os.getuid()}"
    d.mkdir(parents=True, exist_ok=True)
    return d
