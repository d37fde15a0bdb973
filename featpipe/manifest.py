"""--labels FILE: the images of a data dir and their labels from a CSV or Parquet file (Kaggle's `filename,label`, or
`path,label[,split]`) instead of class folders. Paths are relative to DATA_DIR, or absolute. Rows that cannot be
used (no such file, a path listed twice, an empty label, an unknown split) are listed on stderr and skipped; a
file with no usable row is an error."""

from __future__ import annotations

import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from featpipe.dataset import ImageFile, scan, shipped_dataset
from featpipe.errors import UserError

SPLITS = ("train", "val", "test")
SHOWN = 5  # skipped rows named on stderr (all of them are counted)


@dataclass
class Manifest:
    files: list[ImageFile]  # in the file's row order
    classes: list[str]  # sorted
    splits: dict[str, str] = field(default_factory=dict)  # path -> train | val | test; empty: no split column
    skipped: list[dict] = field(default_factory=list)  # {"row", "path", "reason"}

    def skipped_rows(self) -> list[dict]:
        """The skipped rows as commands list skipped files ({"path", "reason"}), the reason naming the row."""
        return [{"path": s["path"], "reason": f"--labels row {s['row']}: {s['reason']}"} for s in self.skipped]


def labelled_files(data_dir: Path | None, labels: Path | None) -> tuple[Path, Manifest]:
    """The labelled images of a data dir: (root, its Manifest), from its class folders (no split, nothing skipped),
    or from the rows of `labels` (paths relative to the data dir)."""
    if labels is None:
        root, files, classes = scan(data_dir)
        return root, Manifest(files, classes)
    root = shipped_dataset() if data_dir is None else Path(data_dir)
    return root, read(labels, root)


def read(labels: Path, root: Path) -> Manifest:
    labels, root = Path(labels), Path(root)
    rows = _table(labels)
    path_col = next((c for c in ("path", "filename") if c in rows), None)
    if path_col is None or "label" not in rows:
        raise UserError(f"{labels} needs a path (or filename) column and a label column; it has "
                        f"{_shown(list(rows)) or 'none'}")
    m, seen = Manifest([], []), {}  # seen: realpath -> (row, label)
    splits = rows.get("split")
    for n, (p, label) in enumerate(zip(rows[path_col], rows["label"])):
        path = _path(str(p), root)
        label = "" if label is None else str(label).strip()
        split = "" if splits is None or splits[n] is None else str(splits[n]).strip().lower()
        reason = _unusable(path, label, split, splits is not None, seen)
        if reason:
            m.skipped.append({"row": n + 1, "path": str(path), "reason": reason})
            continue
        seen[os.path.realpath(path)] = n + 1, label  # ./a, sub/../a and a link to a: one file
        m.files.append(ImageFile(str(path), label))
        if splits is not None:
            m.splits[str(path)] = split
    _report(labels, m, len(rows["label"]))
    m.classes = sorted({f.label for f in m.files})
    return m


def _path(p: str, root: Path) -> Path:
    """A row's file: relative to root unless absolute; a name featpipe wrote percent-encoded (dataset.as_text: not
    UTF-8) is found by its bytes again."""
    path = Path(p) if Path(p).is_absolute() else root / p
    if "%" in p and not os.path.lexists(path):
        from urllib.parse import unquote_to_bytes

        raw = Path(os.fsdecode(unquote_to_bytes(p)))
        path = raw if raw.is_absolute() else root / raw
    return path


def _unusable(path: Path, label: str, split: str, has_splits: bool, seen: dict[str, tuple]) -> str | None:
    if not label:
        return "empty label"
    if (first := seen.get(os.path.realpath(path))) is not None:
        row, other = first
        return f"duplicate of row {row}" + (f", which labels it {other!r}: a conflict" if other != label else "")
    if not path.is_file():
        return "no such file"
    if has_splits and split not in SPLITS:
        return f"split {split!r} is not one of {', '.join(SPLITS)}"
    return None


def _table(labels: Path) -> dict[str, list]:
    """Columns by name (lower-cased), from Parquet (pyarrow) or CSV."""
    if not labels.is_file():
        raise UserError(f"--labels {labels}: no such file")
    try:
        if labels.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            return {k.lower(): v for k, v in pq.read_table(labels).to_pydict().items()}
        # surrogateescape: a file name in raw bytes that are not UTF-8 reads as Python holds such names
        with open(labels, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            header = fh.readline()
            fh.seek(0)
            reader = csv.reader(fh, delimiter=max(",\t;", key=header.count))  # the header's own: CSV, TSV, a;b
            names = [k.strip().lower() for k in next(reader, [])]
            if len(set(names)) < len(names):
                raise UserError(f"--labels {labels}: a column name appears twice ({_shown(names)})")
            out: dict[str, list] = {k: [] for k in names}
            for row in reader:
                for k, v in zip(names, row + [""] * (len(names) - len(row))):
                    out[k].append(v)
            return out
    except ImportError:
        raise UserError("--labels FILE.parquet needs pyarrow: pip install pyarrow") from None
    except (OSError, ValueError, csv.Error, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --labels {labels}: {e}") from None


def _shown(names: list[str]) -> str:
    """Column names for a message: a file that is no table has a 'header' of any length and any bytes."""
    text = ascii(", ".join(names))[1:-1]
    return text[:80] + (" …" if len(text) > 80 else "")


def _report(labels: Path, m: Manifest, rows: int) -> None:
    if not m.files:
        first = m.skipped[0] if m.skipped else None
        raise UserError(f"no usable row in {labels} ({rows} rows)"
                        + (f"; e.g. row {first['row']} ({first['path']}): {first['reason']}" if first else ""))
    if m.skipped:
        named = "; ".join(f"row {s['row']} ({Path(s['path']).name}): {s['reason']}" for s in m.skipped[:SHOWN])
        more = f"; and {len(m.skipped) - SHOWN} more" if len(m.skipped) > SHOWN else ""
        print(f"featpipe: {labels}: {len(m.skipped)} of {rows} row(s) skipped: {named}{more}", file=sys.stderr)
