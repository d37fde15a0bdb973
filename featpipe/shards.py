"""The cache's files (format 2) and what names them; cache.Cache decides when each is written, this module only
knows their layout.

    <cache dir>/<key>.h5             the table: virtual `embeddings`, `sha256`, `path`, `label` over every live
                                     shard; its `shards` attribute is the manifest. Holds no rows; replaced whole.
    <cache dir>/<key>/<id>.h5        a shard: up to SHARD_ROWS rows sorted by sha256, never modified once published
    <cache dir>/<key>/journal-*.fpj  one per running writer: CRC-checked batches, flushed per batch (journal.py)
    <cache dir>/<key>/publish.lock   held while shards and the table are published (seconds, not a whole run)
"""

from __future__ import annotations

import json
import errno
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from featpipe import __version__
from featpipe.errors import UserError
from featpipe.preprocess import Preprocessing
from featpipe.rows import Rows

FORMAT_VERSION = 2
SHARD_ROWS = 65536  # a shard's rows: few files at 10^7 images, and one shard held in memory stays ~0.3 GiB
CHUNK_ROWS = 16  # embeddings chunk: reading one row reads (and checksums) this many, not a whole shard
STRINGS = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class CacheKey:
    backbone: str
    weights_sha256: str
    preprocessing: Preprocessing
    dim: int
    precision: str = "fp32"  # bf16 rows are other numbers than fp32 rows: never the same table
    tta: str = "none"  # "flip": rows averaged with the mirror image's (extract --tta): their own table

    def name(self) -> str:
        tta = "" if self.tta == "none" else f"-{self.tta}"  # caches made before --tta keep their names
        return f"{self.backbone}-{self.weights_sha256[:12]}-{self.preprocessing.digest()[:8]}-{self.precision}{tta}"

    def format1_name(self) -> str:
        return f"{self.backbone}-{self.weights_sha256[:12]}-{self.preprocessing.digest()[:8]}.h5"

    def attrs(self) -> dict:
        return {"backbone": self.backbone, "weights_sha256": self.weights_sha256,
                "preprocessing": self.preprocessing.to_json(), "dim": self.dim, "precision": self.precision,
                **({} if self.tta == "none" else {"tta": self.tta})}


def write_shard(folder: Path, key: CacheKey, rows: Rows) -> tuple[str, int, np.ndarray]:
    """A new shard of `rows` (sorted by sha256, fletcher32 on embeddings and sha256), written to .tmp, fsynced and
    renamed: (its name, its rows, its sorted sha256 column)."""
    _check_space(folder, rows)
    order = np.argsort(np.array(rows.sha256, "S64"), kind="stable")
    rows = rows.take(order)
    name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.h5"  # names sort in publication order
    tmp = folder / f"{name}.tmp"
    n, dim = len(rows), key.dim
    with h5py.File(tmp, "w") as f:
        set_attrs(f, key)
        f.create_dataset("embeddings", data=rows.embeddings.reshape(n, dim).astype(np.float32, copy=False),
                         chunks=(max(1, min(n, CHUNK_ROWS)), dim), fletcher32=True)
        f.create_dataset("sha256", data=np.array(rows.sha256, "S64"), chunks=(max(1, min(n, 4096)),),
                         fletcher32=True)
        f.create_dataset("path", data=os_bytes(rows.paths), dtype=STRINGS)
        f.create_dataset("label", data=os_bytes(rows.labels), dtype=STRINGS)
    fsync_replace(tmp, folder / name)
    return name, n, np.array(rows.sha256, "S64")


def _check_space(folder: Path, rows: Rows) -> None:
    """HDF5 running out of disk mid-write can take the process down with it (a segfault in h5py's cleanup,
    seen here): refuse before writing. The journal still holds the run's rows for the next try."""
    need = rows.embeddings.nbytes + sum(64 + len(p) + len(lbl) for p, lbl in zip(rows.paths, rows.labels))
    free = shutil.disk_usage(folder).free
    if free < need + (1 << 20):
        raise OSError(errno.ENOSPC, f"no space left for the cache: about {need / 2**20:.1f} MiB needed, "
                                    f"{free / 2**20:.1f} MiB free")


def shard_age_seconds(name: str) -> float:
    """Seconds since write_shard named this shard."""
    return (time.time_ns() - int(name.split("-")[0])) / 1e9


def write_table(path: Path, folder: Path, key: CacheKey, manifest: list[tuple[str, int]]) -> None:
    """The virtual datasets over every live shard in `folder` (relative paths: the cache dir can move)."""
    tmp = path.with_name(path.name + ".tmp")
    total, dim = sum(r for _, r in manifest), key.dim
    with h5py.File(tmp, "w") as f:
        set_attrs(f, key)
        f.attrs["shards"] = json.dumps(manifest)
        f.attrs["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for col, dtype, shape in (("embeddings", np.float32, (dim,)), ("sha256", "S64", ()),
                                  ("path", STRINGS, ()), ("label", STRINGS, ())):
            if not total:
                f.create_dataset(col, shape=(0, *shape), dtype=dtype)
                continue
            layout, at = h5py.VirtualLayout(shape=(total, *shape), dtype=dtype), 0
            for name, rows in manifest:
                layout[at:at + rows] = h5py.VirtualSource(f"{folder.name}/{name}", col, shape=(rows, *shape))
                at += rows
            f.create_virtual_dataset(col, layout)
    fsync_replace(tmp, path)


def read_manifest(path: Path, key: CacheKey) -> list[tuple[str, int]]:
    """(shard name, rows) of every live shard, in table order; raises OSError/KeyError/ValueError if unreadable."""
    with h5py.File(path, "r") as f:
        check_attrs(f, key)
        return [(str(n), int(r)) for n, r in json.loads(f.attrs["shards"])]


def tables(cache_dir: Path) -> Iterator[tuple[Path, CacheKey | None]]:
    """Every cache table under cache_dir with its key (None: a format-1 file, or not featpipe's)."""
    for p in sorted(Path(cache_dir).glob("*.h5")):
        try:
            with h5py.File(p, "r") as f:
                a = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            key = CacheKey(a["backbone"], a["weights_sha256"], Preprocessing.from_json(a["preprocessing"]),
                           int(a["dim"]), a["precision"], a.get("tta", "none")) \
                if a.get("format_version") == FORMAT_VERSION else None
        except (OSError, KeyError, ValueError):
            key = None
        yield p, key


def rows_of(f: h5py.File, part: slice = slice(None)) -> Rows:
    """A shard's (or a format-1 file's) rows, all columns."""
    return Rows([h.decode() for h in f["sha256"][part]], f["embeddings"][part], os_strings(f["path"][part]),
                os_strings(f["label"][part]))


def set_attrs(f: h5py.File, key: CacheKey) -> None:
    for k, v in {**key.attrs(), "featpipe_version": __version__, "format_version": FORMAT_VERSION}.items():
        f.attrs[k] = v


def check_attrs(f: h5py.File, key: CacheKey, skip: tuple[str, ...] = ()) -> None:
    for k, v in key.attrs().items():
        got = f.attrs.get(k)
        got = got.decode() if isinstance(got, bytes) else got
        if k not in skip and got != v:
            raise ValueError(f"attribute {k} is {got!r}, expected {v!r}")


def fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)


def os_bytes(names: list[str]) -> np.ndarray:
    """File names are bytes on Linux and may not be UTF-8 (Python holds those as surrogates, which UTF-8 cannot
    encode): store the original bytes, which are plain UTF-8 for every name that is valid UTF-8."""
    return np.array([n.encode("utf-8", "surrogateescape") for n in names], dtype=object)


def os_strings(values) -> list[str]:
    """Inverse of os_bytes: the same str the scan produced."""
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in values]


def writable_dir(d: Path) -> bool:
    """Whether featpipe may write the cache dir `d` (created if missing)."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create cache dir {d}: {e.strerror}") from None
    return can_write(d)


def can_write(path: Path) -> bool:
    """`path`, or the nearest folder above it that exists, is a directory featpipe may add files to."""
    there = next(p for p in [Path(path), *Path(path).absolute().parents] if os.path.lexists(p))
    return there.is_dir() and os.access(there, os.W_OK | os.X_OK) and \
        not (os.geteuid() == 0 and _readonly_mount_or_mode(there))


def _readonly_mount_or_mode(d: Path) -> bool:
    """root ignores mode bits, but a user who made the folder read-only means it; so does a read-only mount."""
    st = os.stat(d)
    if not st.st_mode & 0o222:
        return True
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError as e:
        return e.errno == errno.EROFS
