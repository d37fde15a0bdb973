"""Rows written batch by batch to a CSV or Parquet file (chosen by its suffix), under a temporary name that is
renamed at the end: memory holds one batch, and a killed run leaves no half file."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from featpipe.errors import UserError

SUFFIXES = (".csv", ".parquet")


def check(out: Path, flag: str = "--out") -> Path:
    out = Path(out)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder: name the file to write")
    if out.suffix.lower() not in SUFFIXES:
        raise UserError(f"{flag} {out}: the file name must end in .csv or .parquet")
    if not out.parent.is_dir():
        raise UserError(f"{flag} {out}: folder {out.parent} does not exist")
    return out


class TableWriter:
    """`names`: the columns, all text but those in `floats` (float32 in Parquet)."""

    def __init__(self, out: Path, names: list[str], floats: set[str]):
        self.out, self.names = check(out), names
        self.tmp = self.out.with_name(f".{self.out.name}.tmp")
        self.parquet = self.out.suffix.lower() == ".parquet"
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.schema = pa.schema([(n, pa.float32() if n in floats else pa.string()) for n in names])
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        else:
            self.fh = open(self.tmp, "w", newline="")
            self.writer = csv.writer(self.fh)
            self.writer.writerow(names)

    def write(self, columns: list) -> None:
        """One batch: a sequence per column, in `names` order."""
        if self.parquet:
            import pyarrow as pa

            self.writer.write_table(pa.table(columns, schema=self.schema))
        else:
            self.writer.writerows(zip(*columns))

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        (self.writer if self.parquet else self.fh).close()
        if exc_type is None:
            os.replace(self.tmp, self.out)
        else:
            self.tmp.unlink(missing_ok=True)
