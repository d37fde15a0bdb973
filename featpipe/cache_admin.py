"""`featpipe cache info` and `featpipe cache compact`: every cache key under a cache dir, and its upkeep."""

from __future__ import annotations

import time
from pathlib import Path

from featpipe.cache import Cache, Hashes, tables
from featpipe.errors import UserError
from featpipe.fileindex import INDEX_NAME, indexed_hashes

YOUNG_SECONDS = 3600  # a shard this young may hold rows whose files a running extract has not indexed yet


def info(cache_dir: Path) -> dict:
    found = _tables(cache_dir)
    return {"cache_dir": str(Path(cache_dir).resolve()), "caches": [Cache(cache_dir, k).info() for _, k in found
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
        young = [n for n in cache.shards() if time.time_ns() - int(n.split("-")[0]) < YOUNG_SECONDS * 10**9]
        keep = None if live is None else Hashes(live)
        out.append(cache.compact(keep, spare=young))
    return {"cache_dir": str(Path(cache_dir).resolve()), "caches": out, "file_index_used": live is not None,
            "format1": [str(p) for p, k in found if k is None]}


def _tables(cache_dir: Path) -> list:
    if not Path(cache_dir).is_dir():
        raise UserError(f"cache dir {cache_dir} does not exist")
    return list(tables(cache_dir))
