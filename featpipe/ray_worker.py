"""The work of `featpipe extract --engine ray` on each Ray actor: Ray Data's map_batches callable (ray_data.py).

Built once per actor: model and decoder (runtime.start_embedding), a cache writer with its own journal (cache.py:
concurrent writers), and the hashes the cache held when the driver listed, fetched once from the object store.
Each call takes a batch of file records (path, label, the driver's stat) and reads each file, hashes it, skips the
hashes already cached, probes, decodes, embeds and journals the rows; it returns the records with what became of
each file (sha256, skip reason, status) and, on its first row, the batch's meta (node, journal, stage seconds).
Image bytes and embeddings never leave the actor.
"""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from featpipe import fileindex
from featpipe.cache import Cache
from featpipe.dataset import ImageFile
from featpipe.decode import default_decode_threads, probe
from featpipe.engine import read_hashed
from featpipe.hashes import Hashes
from featpipe.pipeline import StageTimer, hashed
from featpipe.ray_session import die_once
from featpipe.rows import Rows
from featpipe.runtime import embed_decoded, start_embedding
from featpipe.tar_input import member_path, samples

CACHED, NEW = "cached", "new"  # a record's status: a row the cache held at listing, or one journalled this run


class EmbedBatches:
    """One Ray Data actor's state; __call__ maps a numpy batch of file records to the same records, annotated."""

    def __init__(self, cfg, spec, key, seen: list[str], known, cwd: str, die_once_marker: str | None) -> None:
        import ray
        import torch

        self.load = StageTimer()
        self.embedder, self.decoder = start_embedding(cfg, spec, self.load)
        ctx = ray.get_runtime_context()
        cpus = ctx.get_assigned_resources().get("CPU")
        if self.embedder.device.type == "cpu" and cpus:
            torch.set_num_threads(max(1, int(cpus)))  # start_embedding sized threads for the whole machine
        self.known = Hashes.from_sorted(ray.get(known))  # once per actor: Ray Data passes the ref, not the array
        self.cache = Cache(cfg.cache_dir, key).open(seen=seen)
        self.node, self.cwd, self.die_once_marker = ctx.get_node_id(), cwd, die_once_marker
        self.done: set[str] = set()  # hashes this actor journalled: a later copy is not embedded again
        self.failed: dict[str, str] = {}  # hash -> why it did not decode: a later copy is skipped alike
        self.batch_size = cfg.batch_size  # images per forward (EmbedShards' sub-batches of a shard)
        self.readers = ThreadPoolExecutor(default_decode_threads())  # reads wait on disk or network, not CPU
        self.described = {"decoder": self.decoder.name, "device": str(self.embedder.device),
                          "precision": self.embedder.precision}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        timer = StageTimer()
        names = [os.fsdecode(p) for p in batch["path"]]  # as the driver listed them: rows keep the local engine's
        files = [ImageFile(str(Path(name)), label.decode("utf-8", "surrogateescape"))
                 for name, label in zip(names, batch["label"])]
        where = [ImageFile(os.path.join(self.cwd, name), "") for name in names]  # the driver's cwd: a relative data dir
        sha, reason, status = self._settle(files, self.readers.map(lambda f: read_hashed(f, None, timer), where), timer)
        die_once(self.die_once_marker)  # after journalling, before returning: the retried batch journals them again
        n = len(files)
        return {**batch, "sha256": np.array(sha, object), "reason": np.array(reason, object),
                "status": np.array(status, object), "meta": self._meta_column(n, timer)}

    def _settle(self, files: list[ImageFile], read, timer: StageTimer) -> tuple[list[str], list[str], list[str]]:
        """(sha256, skip reason, status) per file, given what reading each gave ((bytes, sha256, unreadable reason),
        in order): cached, a copy of one settled in this actor, or probed, decoded, embedded and journalled."""
        n = len(files)
        sha, reason, status = [""] * n, [""] * n, [""] * n
        todo, copies, queued = [], [], set()
        for i, (data, digest, err) in enumerate(read):
            sha[i], reason[i] = digest or "", err or ""
            if err:
                continue
            if digest in self.known:
                status[i] = CACHED
            elif digest in self.done or digest in self.failed or digest in queued:
                copies.append(i)
            else:
                with timer("probe"):
                    p = probe(data)
                if p.skip_reason:
                    reason[i] = self.failed[digest] = p.skip_reason
                else:
                    todo.append((i, data, p))
                    queued.add(digest)
        self._embed(todo, files, sha, reason, status, timer)
        for i in copies:
            reason[i] = self.failed.get(sha[i], "")
            status[i] = "" if reason[i] else NEW
        return sha, reason, status

    def _embed(self, todo: list, files: list[ImageFile], sha: list[str], reason: list[str], status: list[str],
               timer: StageTimer) -> None:
        """Decode and embed the batch's new images; journal the rows of those that decode."""
        if not todo:
            return
        with timer("decode"):
            pixels, reasons = self.decoder.decode([d for _, d, _ in todo], [p for _, _, p in todo])
        emb = embed_decoded(self.embedder, pixels, reasons, timer)
        ok = []
        for (i, _, _), r in zip(todo, reasons):
            if r:
                reason[i] = self.failed[sha[i]] = r
            else:
                ok.append(i)
                status[i] = NEW
        if ok:
            with timer("write"):
                self.cache.append(Rows([sha[i] for i in ok], np.asarray(emb), [str(files[i].path) for i in ok],
                                       [files[i].label for i in ok]))
            self.done.update(sha[i] for i in ok)

    def _meta(self, n: int, timer: StageTimer) -> str:
        """The batch's meta, on its first record: where it ran, the journal it went to, its stage seconds (and the
        model's load time, on the actor's first batch)."""
        seconds = timer.totals()
        if self.load is not None:
            seconds, self.load = {**seconds, **self.load.totals()}, None
        return json.dumps({"node": self.node, "images": n, "journal": str(self.cache.journal or ""),
                           "seconds": seconds, **self.described})

    def _meta_column(self, n: int, timer: StageTimer) -> np.ndarray:
        return np.array([self._meta(n, timer)] + [""] * (n - 1), object)

    def __del__(self) -> None:
        """Ray Data drops its actors once the dataset is done: the journal becomes a shard here, in parallel on every
        worker; an actor that never gets here leaves it to the driver (ray_data.py adopts dead writers' journals)."""
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.publish()
            cache.close()


class EmbedShards(EmbedBatches):
    """The same for WebDataset shards: a call takes shard records (path, the driver's stat), streams each shard once
    (tar_input.samples), settles its samples a batch at a time as EmbedBatches settles files, and returns one record
    per sample: the shard's position, the sample's place in it and how many the shard has (the driver lists a shard
    once all are back), its path (SHARD#MEMBER) and label, what the tar itself said of it (the shard's listing for
    the file index), what became of it, and whether this node saw the shard with the driver's stat (if not,
    nothing of it may be recorded under that stat)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        timer = StageTimer()
        out: dict[str, list] = {c: [] for c in SAMPLE_COLUMNS}
        for pos, path, *stamp in zip(*(batch[c] for c in ("pos", "path", "size", "ino", "mtime", "ctime"))):
            shard = Path(os.fsdecode(path))
            st = fileindex.stat(Path(self.cwd, shard))
            same = st is not None and fileindex.Stamp.of(st) == tuple(int(v) for v in stamp)
            stream, k, first = samples(Path(self.cwd, shard)), 0, len(out["pos"])
            while chunk := self._next_chunk(stream, timer):
                files = [ImageFile(str(Path(member_path(shard, s.member))), s.label) for s in chunk]
                sha, reason, status = self._settle(files, [hashed(s.data, s.reason, timer) for s in chunk], timer)
                for s, f, *settled in zip(chunk, files, sha, reason, status):
                    row = (int(pos), k, os.fsencode(f.path), f.label, s.member or "", s.reason or "", *settled,
                           same)
                    for c, v in zip(SAMPLE_COLUMNS, row):  # all but "of", known once the shard is read
                        out[c].append(v)
                    k += 1
            out["of"] += [k] * (len(out["pos"]) - first)
        die_once(self.die_once_marker)
        n = len(out["pos"])
        return {**{c: np.array(v, {"pos": np.int64, "k": np.int64, "of": np.int64, "same_stat": bool}.get(c, object))
                   for c, v in out.items()},
                "meta": self._meta_column(n, timer) if n else np.array([], object)}

    def _next_chunk(self, stream, timer: StageTimer) -> list:
        with timer("read"):
            return list(itertools.islice(stream, self.batch_size))


SAMPLE_COLUMNS = ("pos", "k", "path", "label", "member", "listed_reason", "sha256", "reason", "status", "same_stat",
                  "of")
