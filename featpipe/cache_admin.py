"""`featpipe cache info` and `featpipe cache compact`: every cache key under a cache dir, and its upkeep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featpipe import journal
from featpipe.cache import Cache
from featpipe.errors import UserError
from featpipe.fileindex import INDEX_NAME, indexed_hashes
from featpipe.hashes import Hashes
from featpipe.rows import Rows
from featpipe.shards import SHARD_ROWS, shard_age_seconds, tables

YOUNG_SECONDS = 3600  # a shard this young may hold rows whose files a running extract has not indexed yet


def info(cache_dir: Path) -> dict:
    found = _tables(cache_dir)
    return {"cache_dir": str(Path(cache_dir).resolve()), "caches": [key_info(Cache(cache_dir, k)) for _, k in found
                                                                      if k is not None],
            "format1": [str(p) for p, k in found if k is None],
            "file_index": str(Path(cache_dir) / INDEX_NAME)}


def compact(cache_dir: Path) -> dict:
    """Merge each key's small shards; drop the rows no file in the file index refers to (all rows are kept when
    there is no index: it is the only record of which images still exist)."""
    found = _tables(cache_dir)
    live = indexed_hashes(cache_dir)
    out = []
    for _, key in found:
        if key is None:
            continue
        cache = Cache(cache_dir, key).open()
        if not cache.writable:
            raise UserError(f"cache dir {cache_dir} is not writable: compact needs write access")
        young = [n for n in cache.shards() if shard_age_seconds(n) < YOUNG_SECONDS]
        out.append(compact_key(cache, None if live is None else Hashes(live), spare=young))
    return {"cache_dir": str(Path(cache_dir).resolve()), "caches": out, "file_index_used": live is not None,
            "format1": [str(p) for p, k in found if k is None]}


def _tables(cache_dir: Path) -> list:
    if not Path(cache_dir).is_dir():
        raise UserError(f"cache dir {cache_dir} does not exist")
    return list(tables(cache_dir))


def key_info(cache: Cache) -> dict:
    manifest = cache.manifest()
    files = [cache.path, *(cache.dir / n for n, _ in manifest), *cache.dir.glob(journal.PATTERN)]
    key = cache.key
    return {"key": key.name(), "backbone": key.backbone, "precision": key.precision, "dim": key.dim,
            "weights_sha256": key.weights_sha256, "table": str(cache.path), "rows": sum(r for _, r in manifest),
            "shards": len(manifest), "journal_rows": sum(len(r) for r in cache.journal_records()),
            "bytes": sum(p.stat().st_size for p in files if p.exists())}


def compact_key(cache: Cache, live: Hashes | None, spare: list[str] = ()) -> dict:
    """Rewrite the shards that are small or hold rows outside `live` (None: keep every row; shards in `spare`
    keep theirs) into full shards, switch the table to them, delete the old ones. A kill leaves the old table
    or the new one; the files the live table does not list are deleted by the next publish or compact."""
    before = key_info(cache)
    with cache.locked():
        cache.drop_leftovers()  # a killed compact's merged shards: never listed, so this one would keep them
        cache.adopt_journals()
        keep, redo, stale = [], [], False
        for name, n in cache.manifest():
            dead = live is not None and name not in spare and not live.isin(cache.shard_sha256(name)).all()
            stale |= dead
            (redo if dead or n < SHARD_ROWS // 2 else keep).append((name, n))
        if not stale and len(redo) < 2:  # nothing to drop, nothing to merge
            return {**before, "dropped_rows": 0, "shards_after": before["shards"]}
        merged = _merge(cache, redo, live, spare)
        cache.write_table(keep + merged)
        for name, _ in redo:
            (cache.dir / name).unlink(missing_ok=True)
    after = key_info(cache)
    return {**before, "dropped_rows": before["rows"] - after["rows"], "shards_after": after["shards"]}


def _merge(cache: Cache, shards: list[tuple[str, int]], live: Hashes | None, spare) -> list[tuple[str, int]]:
    """Their live rows as full shards, holding at most two shards' rows in memory."""
    out, pending = [], Rows.empty(cache.key.dim)
    for name, _ in shards:
        rows = cache.shard_rows(name)
        if rows is None:
            continue
        if live is not None and name not in spare:
            rows = rows.take(np.flatnonzero(live.isin(np.array(rows.sha256, "S64"))))
        pending = Rows.concat([pending, rows], cache.key.dim)
        while len(pending) >= SHARD_ROWS:
            out.append(cache.write_shard(pending.take(range(SHARD_ROWS))))
            pending = pending.take(range(SHARD_ROWS, len(pending)))
    if len(pending):
        out.append(cache.write_shard(pending))
    return out
