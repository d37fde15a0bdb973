"""Ray itself for `featpipe extract --engine ray` (ray_data.py): join `--ray-address` or start a small private Ray
(shut down after the run, no process left behind), size the actor pool from the cluster's CPUs and GPUs, and the
test hook that kills an actor once. Nothing here imports torch: the driver only lists files."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from pathlib import Path

from featpipe.errors import UserError
from featpipe.pipeline import StageTimer

OBJECT_STORE_BYTES = 200 * 2**20  # a local Ray holds file records and the known hashes, never image bytes
REAP_SECONDS = 3  # after ray.shutdown(): how long a local Ray's leftover agents and workers get to exit on SIGTERM
DIE_ONCE_ENV = "FEATPIPE_RAY_DIE_ONCE"  # test hook, see die_once
# The AF_UNIX path limit (107 bytes) minus the longest socket path Ray puts under its temp dir (pids up to 7 digits).
# 60 was 2-4 bytes short: a cache dir under /tmp/pytest-of-root/pytest-128/ broke ray.init.
RAY_SOCKET_SUFFIX = "/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store"
_SOCKET_PATH_ROOM = 107 - len(RAY_SOCKET_SUFFIX)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install featpipe[ray]") from None
    return ray


def die_once(marker: str | None) -> None:
    """Test hook ($FEATPIPE_RAY_DIE_ONCE=<marker path>): the first actor to create the marker exits abruptly, as an
    OOM-killed or crashed worker would; the marker then keeps its restarted self and its peers alive."""
    if not marker:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os._exit(1)


class RaySession:
    """Ray is started (or joined) only by start(), which the driver calls once some file needs a worker: a fully
    cached run never touches Ray."""

    def __init__(self, cfg):  # cfg: ExtractConfig
        self.cfg = cfg
        self.ray = import_ray()
        if cfg.workers and not cfg.ray_address:  # now, not after the tens of seconds a local Ray takes to start
            _check_workers(cfg.workers, local_cpus(), None, gpu=False, where="this machine (a local Ray)")
        self.started_ray = False
        self.ray_children: list = []  # the processes ray.init started here (gcs, raylet, ...), see close()
        self.released = threading.Event()  # set once a local Ray is shut down: its owner thread may end

    def start(self, timer: StageTimer) -> tuple[bool, int]:
        """Connect; returns (one GPU per actor?, actors)."""
        with timer("ray_start"):
            self._connect()
        gpu = self.cfg.device != "cpu" and self.ray.cluster_resources().get("GPU", 0) >= 1
        if self.cfg.device == "cuda" and not gpu:
            raise UserError("--device cuda requested but the Ray cluster has no GPU")
        return gpu, self._worker_count(gpu)

    def close(self) -> None:
        """ray.shutdown() gives the raylet one second to stop its agents and workers before SIGKILL; on a busy
        machine that is too short and they linger, orphaned, for a minute or two. Whatever is left is stopped here."""
        if self.started_ray:
            procs = _with_descendants(self.ray_children)  # listed now: once the raylet is gone, workers are orphans
            try:
                self.ray.shutdown(wait_for_processes=True)
            except TypeError:  # Ray before 2.5x has no wait_for_processes: stop_processes() below covers it
                self.ray.shutdown()
            stop_processes(procs)
            self.started_ray = False
        self.released.set()

    def _init_local_ray(self, **kw) -> None:
        """ray.init on a thread that lives until the run ends: Ray's own processes get SIGKILL when the thread that
        started them ends (PR_SET_PDEATHSIG)."""
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
        self.started_ray = True  # close() disconnects from a cluster too (and leaves it running)


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
    psutil.wait_procs(alive, timeout=grace)  # gone before the caller adopts their journals (their flocks free)


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
