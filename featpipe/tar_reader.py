"""Extraction's reader for WebDataset shards: what engine.Engine's reader does for files, for the samples of .tar
shards (tar_input.py). A shard the file index knows unchanged, whose images all have a cache row (or are known not
to decode), is listed from the index without being opened; any other shard is streamed once, each image hashed as
it passes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

from featpipe import fileindex
from featpipe.dataset import ImageFile
from featpipe.hashes import Hashes
from featpipe.pipeline import StageTimer, hashed
from featpipe.tar_input import member_path, samples

Read = tuple[ImageFile, bytes | None, str | None, str | None]  # (sample, bytes, sha256, skip reason)


def read_shards(shards: list[Path], known: Hashes, index: fileindex.FileIndex, timer: StageTimer) -> Iterator[Read]:
    """(sample, bytes, sha256, reason) per sample, in shard order: bytes None when the sample need not be read
    (cached) or cannot be used (reason)."""
    for shard in shards:
        with timer("stat"):
            st = fileindex.stat(shard)
            found = listed(shard, st, known, index) if st else None
        yield from found if found is not None else _streamed(shard, st, index, timer)


def listed(shard: Path, st, known: Hashes, index: fileindex.FileIndex) -> list[Read] | None:
    """The shard's samples from the index, or None when it must be read: changed, never listed whole, or holding
    an image neither cached nor known to fail (a new backbone's cache, say)."""
    entries = index.listing(shard, st)
    if entries is None:
        return None
    out = []
    for member, label, reason in entries:
        f = ImageFile(str(Path(member_path(shard, member))), label)
        if reason:
            out.append((f, None, None, reason))
            continue
        digest = index.unchanged(f.path, st)
        if digest in known:
            out.append((f, None, digest, None))
        elif digest is not None and (failed := index.failure(f.path)):
            out.append((f, None, None, failed))
        else:
            return None
    return out


def _streamed(shard: Path, st, index: fileindex.FileIndex, timer: StageTimer) -> Iterator[Read]:
    """Every sample read and its image hashed; the members are recorded as the shard's stat found them before."""
    read_at_ns = time.time_ns()  # one instant for the whole shard: its members are recorded all or none
    if st:
        index.forget_members(shard)
    listing, stream = [], samples(shard)
    while True:
        with timer("read"):
            s = next(stream, None)
        if s is None:
            break
        f = ImageFile(str(Path(member_path(shard, s.member))), s.label)
        listing.append([s.member, s.label, s.reason or ""])
        data, digest, reason = hashed(s.data, s.reason, timer)
        if st and data is not None:
            index.record(f.path, st, digest, read_at_ns)
        yield f, data, digest, reason
    if st:
        index.record_listing(shard, st, listing, read_at_ns)
