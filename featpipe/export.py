"""`featpipe export-embeddings`: the data dir's embeddings (extracting what is missing) to a file other tools read.

Parquet (pyarrow): columns path, label, sha256 and `embedding` (fixed-size list of float32), read by pandas,
polars, DuckDB, LanceDB. npy: the (N, dim) float32 matrix, and beside it a CSV of path, label, sha256 per row.
One row per file, in sorted path order; written in batches (memory holds one batch of rows) to a temporary name,
then renamed: a killed export leaves no half file."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featpipe.dataset import as_text
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig, ExtractResult

FORMATS = ("parquet", "npy")
BATCH = 8192


@dataclass(frozen=True)
class ExportConfig:
    extract: ExtractConfig
    out: Path
    format: str | None = None  # None: --out's suffix says (.npy: npy; else parquet)

    def __post_init__(self) -> None:
        suffix = Path(self.out).suffix.lower()
        object.__setattr__(self, "format", self.format or ("npy" if suffix == ".npy" else "parquet"))
        if self.format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if suffix in (".parquet", ".npy") and suffix != f".{self.format}":
            raise UserError(f"--out {self.out} ends in {suffix} but --format is {self.format}: name the file "
                            f".{self.format}, or leave --format out")
        if Path(self.out).is_dir():
            raise UserError(f"--out {self.out} is a folder: name the file to write")
        if not Path(self.out).parent.is_dir():
            raise UserError(f"--out {self.out}: folder {Path(self.out).parent} does not exist")


def export(cfg: ExportConfig, result: ExtractResult) -> dict:
    """Write the rows of `result`'s images (an extract run over cfg.extract) to cfg.out; a summary dict."""
    members = result.members.by_path()
    out = Path(cfg.out)
    try:
        files = (_parquet if cfg.format == "parquet" else _npy)(members, result, out)
    finally:  # a failed write leaves no temporary file behind
        for p in (out, out.with_suffix(".npy"), out.with_suffix(".csv")):
            p.with_name(f".{p.name}.tmp").unlink(missing_ok=True)
    return {"rows": len(members), "dim": result.dim, "format": cfg.format, "files": [str(f) for f in files],
            "backbone": result.backbone, "data_dir": result.data_dir}


def _batches(members, result: ExtractResult):
    for start in range(0, len(members), BATCH):
        part = members[start:start + BATCH]
        yield part, result.cache.embeddings([m.sha256 for m in part])


def _parquet(members, result: ExtractResult, out: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("path", pa.string()), ("label", pa.string()), ("sha256", pa.string()),
                        ("embedding", pa.list_(pa.float32(), result.dim))])
    tmp = out.with_name(f".{out.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as w:
        for part, X in _batches(members, result):
            w.write_table(pa.table([pa.array([as_text(m.path) for m in part]),
                                    pa.array([as_text(m.label) for m in part]),
                                    pa.array([m.sha256 for m in part]),
                                    pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1)), result.dim)],
                                   schema=schema))
    os.replace(tmp, out)
    return [out]


def _npy(members, result: ExtractResult, out: Path) -> list[Path]:
    out = out.with_suffix(".npy")
    index = out.with_suffix(".csv")
    tmp, tmp_index = out.with_name(f".{out.name}.tmp"), index.with_name(f".{index.name}.tmp")
    matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(members), result.dim))
    with open(tmp_index, "w", newline="") as fh:
        rows = csv.writer(fh)
        rows.writerow(["path", "label", "sha256"])
        at = 0
        for part, X in _batches(members, result):
            matrix[at:at + len(part)] = X
            at += len(part)
            rows.writerows([as_text(m.path), as_text(m.label), m.sha256] for m in part)
    matrix.flush()
    del matrix
    os.replace(tmp_index, index)
    os.replace(tmp, out)
    return [out, index]
