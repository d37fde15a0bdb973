"""`featpipe extract --engine ray` on Ray Data: the driver lists, the workers read, hash, decode, embed and write.

The driver stats every file and asks the file index (fileindex.FileIndex.lookup) which ones are unchanged and
cached, or known not to decode: those are settled without reading a byte. The rest go, as small records (path,
label, stat), into a Parquet listing in the cache dir, which `read_parquet` streams to `map_batches` over a pool
of actors (ray_worker.EmbedBatches: model, decoder, cache writer and known hashes built once per actor). Each actor
reads its files from the shared filesystem, embeds the new ones and journals their rows straight into the shared
cache (one journal per actor); the driver gets the records back (sha256, skip reason, status) and updates the
file index and the report. Once the dataset is done, each actor publishes its journal as it exits, and the
driver publishes what a dead actor left (Cache.adopt_journals).

WebDataset shards: the driver settles a shard the index lists unchanged without opening it (tar_reader.listed);
each other shard is one listing record, streamed whole by one actor (ray_worker.EmbedShards), whose sample records
come back like file records; the driver then records the shard's listing in the file index.

Why a Parquet listing rather than `from_items`: from_items puts every record in the object store before the first
batch runs; read_parquet streams the listing a block at a time, so driver and object store hold a few blocks of
records whatever the dataset size. Ray Data retries the batches of an actor that died (max_restarts and
max_task_retries); rows it journalled before dying are published once (a publish drops hashes already held).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

from featpipe import fileindex
from featpipe.cache import Cache
from featpipe.dataset import ImageFile
from featpipe.engine import Shards
from featpipe.errors import UserError, first_line
from featpipe.hashes import Hashes
from featpipe.journal import locked_new, try_lock
from featpipe.members import Members
from featpipe.pipeline import StageTimer
from featpipe.ray_session import DIE_ONCE_ENV, RaySession
from featpipe.ray_worker import CACHED, SAMPLE_COLUMNS, EmbedBatches, EmbedShards
from featpipe.tar_reader import listed

PART_ROWS = 16384  # records per listing file: one read task's block, split into batches as Ray Data reads it
BATCH = {False: 32, True: 256}  # images per actor call without / with a GPU (embed.default_batch_size's for CUDA)
RETRIES = 3  # restarts of a dead actor, and re-runs of the batch it was working on
ACTOR_START_S = 600  # for the pool's actors to start (model loaded): then a clear error, not a wait forever
JOURNAL_WAIT_S = 120  # after the dataset: how long the actors get to publish their journals as they exit
PROGRESS_EVERY = 256  # listed files between progress updates
LISTING = ".ray-listing"  # <cache dir>/.ray-listing-<host>-<driver pid>-<random>: a driver's file records (+ .lock)


class RayDataEngine:
    """engine.Engine's interface for extract.py: run() -> (hashes computed, skipped); members, reused_files,
    inputs, first_copy; described()."""

    def __init__(self, cfg, spec, key, timer: StageTimer, index: fileindex.FileIndex):
        self.cfg, self.spec, self.key, self.timer, self.index = cfg, spec, key, timer, index
        self.session = RaySession(cfg)  # imports Ray and checks --workers before any file is listed
        self.skipped: list[dict] = []
        self.reused_files = 0
        self.first_copy: set[str] = set()  # hashes this run embedded (first copy of each)
        self.inputs = 0
        self.placed: list[tuple] = []  # (place, member), place: a file's position, or (shard's, sample's) in it
        self.nodes: dict[str, int] = {}  # node id -> images its actors took
        self.journals: set[str] = set()  # the actors' journals: published (or left by a dead actor) before we end
        self.shard_at: dict[int, tuple[Path, fileindex.Stamp | None]] = {}  # shards sent to actors: path, stat
        self.samples: dict[int, list] = {}  # shards partly back: position -> (place, [member, label, tar's reason])
        self.unlisted: set[int] = set()  # shards an actor saw with another stat: not listed in the file index
        self._described: dict[str, set] = {"decoder": set(), "device": set(), "precision": set()}
        self.done = 0

    @property
    def members(self) -> Members:
        out = Members()
        for _, f, sha in sorted(self.placed, key=lambda p: p[0]):
            out.append(f, sha)
        return out

    def described(self) -> tuple[str, str, str]:
        return tuple(",".join(sorted(v)) or "none" for v in self._described.values())

    def run(self, files: list[ImageFile] | Shards, known: Hashes, cache: Cache, progress):
        remove_dead_listings(cache.root.resolve())
        listing = cache.root.resolve() / f"{LISTING}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        lock = listing.with_name(f"{listing.name}.lock")
        owner = locked_new(lock)  # made before the listing, deleted after it: remove_dead_listings
        shards = isinstance(files, Shards)
        try:
            listed_at_ns = time.time_ns()  # before any stat: no later than any worker's read
            rows = self._list_shards(files.paths, known, listing, progress) if shards else \
                self._list(files, known, listing, progress, len(files))
            if rows:
                self._embed_on_ray(listing, rows, known, cache, progress, None if shards else len(files),
                                   listed_at_ns, shards)
        finally:
            shutil.rmtree(listing, ignore_errors=True)
            lock.unlink(missing_ok=True)
            owner.close()
        self.skipped.sort(key=lambda s: s["path"])
        return set(self.first_copy), self.skipped

    def _list(self, files: list[ImageFile], known: Hashes, listing: Path, progress, total: int) -> int:
        """Settle what the index knows without reading; write the rest to the listing. Returns its records."""
        listing.mkdir()
        part: list[tuple] = []
        rows = 0
        for pos, f in enumerate(self.index.prefetching(files, lambda f: f.path)):
            self.inputs += 1
            with self.timer("stat"):
                st, digest, failed = self.index.lookup(f.path)
            if digest in known:
                self.placed.append((pos, f, digest))
                self.reused_files += 1
                self.done += 1
            elif failed:
                self.skipped.append({"path": f.path, "reason": failed})
                self.done += 1
            else:
                part.append((pos, os.fsencode(f.path), f.label.encode("utf-8", "surrogateescape"),
                             *(fileindex.Stamp.of(st) if st else (-1, 0, 0, 0))))
            if len(part) == PART_ROWS or (pos + 1 == total and part):
                rows, part = rows + _write_part(listing, rows, part), []
            if progress and (pos % PROGRESS_EVERY == 0 or pos + 1 == total):
                progress(self.done, total)
        return rows

    def _list_shards(self, shards: list[Path], known: Hashes, listing: Path, progress) -> int:
        """A shard the index lists unchanged and settled (tar_reader.listed) is settled here without opening it;
        the others go to the listing, one record per shard (an actor streams the whole shard). Returns them."""
        listing.mkdir()
        part = []
        for pos, shard in enumerate(shards):
            with self.timer("stat"):
                st = fileindex.stat(shard)
                found = listed(shard, st, known, self.index) if st else None
            for k, (f, _, digest, reason) in enumerate(found or ()):
                self.inputs, self.done = self.inputs + 1, self.done + 1
                self._place((pos, k), f.path, f.label, digest or "", reason or "", CACHED, None, 0)
            if found is None:
                if st:
                    self.index.forget_members(shard)  # recorded again, as its actor reads it
                self.shard_at[pos] = shard, st and fileindex.Stamp.of(st)
                part.append((pos, os.fsencode(str(shard)), b"", *(self.shard_at[pos][1] or (-1, 0, 0, 0))))
        if progress:
            progress(self.done, None)
        return _write_part(listing, 0, part) if part else 0

    def _embed_on_ray(self, listing: Path, rows: int, known: Hashes, cache: Cache, progress, total: int | None,
                      listed_at_ns: int, shards: bool) -> None:
        """Ray's raylet prints events ("worker died, retrying") to stdout, which `--json` reserves for its one
        object: they go to stderr until Ray is shut down."""
        with contextlib.redirect_stdout(sys.stderr):
            try:
                gpu, workers = self.session.start(self.timer)
                for batch in self._dataset(listing, rows, known, cache, gpu, workers, shards):
                    (self._settle_samples if shards else self._settle)(batch, listed_at_ns)
                    if progress:
                        progress(self.done, total)
                self._wait_for_journals()
                self._record_listings(listed_at_ns)
                print(f"featpipe: ray: {rows} {'shards' if shards else 'files'} read on {len(self.nodes)} node(s): "
                      + ", ".join(f"node {node[:12]} {n}" + (" samples" if shards else "")
                                  for node, n in sorted(self.nodes.items())), file=sys.stderr)
            except self.session.ray.exceptions.RayError as e:
                raise UserError(f"Ray workers failed: {_worker_error(e)}") from None
            finally:
                self.session.close()
        with self.timer("commit"), cache.locked():
            cache.adopt_journals()  # what actors that died (or were killed by ray.shutdown) had journalled

    def _dataset(self, listing: Path, rows: int, known: Hashes, cache: Cache, gpu: bool, workers: int,
                 shards: bool):
        """The records' batches as they finish, in any order (shards: one shard per call, its samples' records)."""
        ray = self.session.ray
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # featpipe's own progress is on stderr; Ray Data's would interleave with it
        ctx.print_on_execution_start = False
        ctx.wait_for_min_actors_s = ACTOR_START_S  # every actor up before the first batch: the first does not take all
        for h in logging.getLogger("ray.data").handlers:  # its session log file keeps everything
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.CRITICAL)  # its lines on stderr would drown featpipe's (errors: one line)
        # The v2 Parquet reader lists files in a task that wants a whole CPU, which a pool of one actor per CPU
        # never frees; v1 reads with num_cpus=0 and splits each file into batch-sized blocks.
        ctx.use_datasource_v2 = False
        batch = self.cfg.batch_size or BATCH[gpu]
        # Workers run elsewhere, in another directory: every path they get is absolute (data paths: via cwd).
        cfg = replace(self.cfg, batch_size=batch, cache_dir=Path(self.cfg.cache_dir).resolve(),
                      weights=self.cfg.weights and Path(self.cfg.weights).resolve())
        kwargs = {"cfg": cfg, "spec": self.spec, "key": self.key, "seen": cache.shards(),
                  "known": ray.put(known.sorted), "cwd": os.getcwd(), "die_once_marker": os.environ.get(DIE_ONCE_ENV)}
        fn, per_call = (EmbedShards, 1) if shards else (EmbedBatches, batch)
        calls = max(1, math.ceil(rows / per_call))  # no more actors than calls: each loads a model
        ds = ray.data.read_parquet(str(listing), num_cpus=0, override_num_blocks=calls)
        with warnings.catch_warnings():  # max_restarts has no named parameter in Ray 2.60 yet
            warnings.simplefilter("ignore")
            ds = ds.map_batches(fn, batch_size=per_call, batch_format="numpy",
                                compute=ray.data.ActorPoolStrategy(size=min(workers, calls)), num_cpus=1,
                                num_gpus=int(gpu),
                                fn_constructor_kwargs=kwargs, max_restarts=RETRIES, max_task_retries=RETRIES)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")

    def _settle(self, batch: dict, listed_at_ns: int) -> None:
        """One batch of file records back from a worker: the file index, the report and the members."""
        self._add_metas(batch)
        for rec in zip(*(batch[c] for c in (*_COLUMNS, "sha256", "reason", "status"))):
            pos, path_b, label_b, size, ino, mtime, ctime, sha, reason, status = rec
            self.done += 1
            stamp = fileindex.Stamp(int(size), int(ino), int(mtime), int(ctime)) if size >= 0 else None
            self._place(int(pos), os.fsdecode(path_b), label_b.decode("utf-8", "surrogateescape"), sha, reason,
                        status, stamp, listed_at_ns)

    def _settle_samples(self, batch: dict, listed_at_ns: int) -> None:
        """One shard's sample records: as files, under the shard's stat; and what the tar said of each sample, for
        the shard's listing in the file index (an unchanged shard is then listed without being opened)."""
        self._add_metas(batch)
        for pos, k, path_b, label, member, listed_reason, sha, reason, status, same_stat, of in zip(
                *(batch[c] for c in SAMPLE_COLUMNS)):
            self.inputs, self.done = self.inputs + 1, self.done + 1
            self.samples.setdefault(int(pos), []).append((int(k), [member or None, label, listed_reason]))
            if not same_stat:  # the actor's node did not see the shard the driver stat'ed: record nothing of it
                self.unlisted.add(int(pos))
            self._place((int(pos), int(k)), os.fsdecode(path_b), label, sha, reason, status,
                        self.shard_at.get(int(pos), (None, None))[1] if same_stat else None, listed_at_ns)
            if len(self.samples[int(pos)]) == of:  # listed now: memory holds the shards in flight, not every sample
                self._record_listing(int(pos), listed_at_ns)

    def _place(self, where, path: str, label: str, sha: str, reason: str, status: str, stamp, read_at_ns: int):
        """One input settled: recorded in the file index (under `stamp`, when taken), skipped, or a member."""
        if sha and stamp is not None:
            self.index.record(path, stamp, sha, read_at_ns)
        if reason:
            self.skipped.append({"path": path, "reason": reason})
            if sha:
                self.index.record_failure(path, reason)
            return
        self.placed.append((where, ImageFile(path, label), sha))
        if status == CACHED or sha in self.first_copy:  # cached before, or a copy of a file embedded now
            self.reused_files += 1
        else:
            self.first_copy.add(sha)

    def _record_listings(self, read_at_ns: int) -> None:
        """The shards not listed yet once the dataset is done: those without samples (their calls return no row)."""
        for pos in list(self.shard_at):
            self._record_listing(pos, read_at_ns)

    def _record_listing(self, pos: int, read_at_ns: int) -> None:
        """A shard whose samples are all back, in the file index, unless an actor saw it with another stat than
        the driver; then its samples are let go (memory holds the shards in flight, not every sample)."""
        shard, stamp = self.shard_at.pop(pos, (None, None))  # (None: a row past the count, which Ray never sends)
        entries = sorted(self.samples.pop(pos, []), key=lambda ke: ke[0])
        if stamp is not None and pos not in self.unlisted:  # (flushed with the next records: a killed run keeps it)
            self.index.record_listing(shard, stamp, [e for _, e in entries], read_at_ns)

    def _add_metas(self, batch: dict) -> None:
        for meta in batch["meta"]:
            if meta:
                self._add_meta(json.loads(meta))

    def _add_meta(self, meta: dict) -> None:
        self.nodes[meta["node"]] = self.nodes.get(meta["node"], 0) + meta["images"]
        if meta["journal"]:
            self.journals.add(meta["journal"])
        for k in self._described:
            self._described[k].add(meta[k])
        for stage, s in meta["seconds"].items():
            self.timer.add(stage, s)

    def _wait_for_journals(self) -> None:
        """Each actor publishes its journal as Ray Data lets it go; wait (bounded) until every journal is gone or
        its writer dead, so that the driver publishes, not the next run."""
        deadline = time.monotonic() + JOURNAL_WAIT_S
        pending = {Path(j) for j in self.journals}
        while pending and time.monotonic() < deadline:
            pending = {p for p in pending if p.exists() and not _released(p)}
            if pending:
                time.sleep(0.1)


_COLUMNS = ("pos", "path", "label", "size", "ino", "mtime", "ctime")


def _write_part(listing: Path, rows: int, part: list[tuple]) -> int:
    """Records (_COLUMNS) as the listing's next Parquet file; returns how many."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = list(zip(*part))
    pq.write_table(pa.table({name: pa.array(c, t) for name, c, t in zip(_COLUMNS, cols, _types(pa))}),
                   listing / f"part-{rows // PART_ROWS:06d}.parquet")
    return len(part)


def _types(pa) -> list:
    return [pa.int64(), pa.binary(), pa.binary(), pa.int64(), pa.uint64(), pa.int64(), pa.int64()]


def _released(journal: Path) -> bool:
    """Whether a journal's writer is gone (its flock is free)."""
    fd = try_lock(journal)
    if fd is None:
        return False
    os.close(fd)
    return True


def _worker_error(e: BaseException) -> str:
    """The worker's own error: the first exception line of the traceback text that Ray's wrappers carry (the
    exception itself comes back only as text)."""
    found = [line for line in str(e).splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception): ", line)]
    return found[0] if found else first_line(e)


def remove_dead_listings(root: Path) -> None:
    """Listings that drivers on this host left when they were killed: their lock is free, or gone (it is made
    before the listing and deleted after it). A lock, not a pid: pids are reused. Other hosts' are theirs to judge
    (flock over a network file system is not to be trusted)."""
    mine = f"{LISTING}-{socket.gethostname()}-"
    for lock in root.glob(f"{mine}*.lock"):
        if (fd := try_lock(lock)) is not None:
            shutil.rmtree(lock.with_suffix(""), ignore_errors=True)
            lock.unlink(missing_ok=True)
            os.close(fd)
    for d in root.glob(f"{mine}*"):
        if d.is_dir() and not d.with_name(f"{d.name}.lock").exists():
            shutil.rmtree(d, ignore_errors=True)
