"""`featpipe cache info` and `featpipe cache compact`."""

from __future__ import annotations

from pathlib import Path

import typer

from featpipe.cli.app import CacheDirOpt, JsonOpt, app, emit


cache_app = typer.Typer(help="Inspect and maintain the embedding caches (`cache info`, `cache compact`).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info")
def cache_info(cache_dir: CacheDirOpt = Path("cache"), as_json: JsonOpt = False) -> None:
    """Per cache key: rows, shards, bytes, backbone, precision."""
    from featpipe.cache_admin import info

    r = info(cache_dir)
    lines = [f"{c['key']}: {c['rows']} rows in {c['shards']} shard(s), {c['bytes'] / 2**20:.1f} MiB"
             + (f", {c['journal_rows']} in journals" if c["journal_rows"] else "") for c in r["caches"]]
    lines += [f"{p}: format 1 (the next extract with its backbone converts it)" for p in r["format1"]]
    emit(r, as_json, "\n".join(lines) or f"no caches in {cache_dir}")


@cache_app.command("compact")
def cache_compact(cache_dir: CacheDirOpt = Path("cache"), as_json: JsonOpt = False) -> None:
    """Merge small shards into full ones and drop rows that no file in the file index refers to any more
    (shards younger than an hour keep every row). Crash-safe: a kill leaves the cache as before or as after."""
    from featpipe.cache_admin import compact

    r = compact(cache_dir)
    lines = [f"{c['key']}: {c['shards']} -> {c['shards_after']} shard(s), {c['dropped_rows']} unreferenced row(s) "
             f"dropped" for c in r["caches"]]
    if not r["file_index_used"]:
        lines.append("no file index: every row kept")
    emit(r, as_json, "\n".join(lines) or f"no caches in {cache_dir}")
