"""Format 1 (featpipe 0.x: one HDF5 file per key, rewritten on every change, and a journal beside it) converted to
today's shards, SHARD_ROWS rows at a time, by the first writer that finds it; then it is removed."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable

import h5py

from featpipe import journal
from featpipe.errors import UserError, first_line
from featpipe.rows import Rows
from featpipe.shards import SHARD_ROWS, CacheKey, check_attrs, rows_of


def convert(legacy: Path, key: CacheKey, publish: Callable[[Rows], None]) -> None:
    """publish() each part of `legacy` (and of its journal); a corrupt file is moved aside, its rows recomputed."""
    format1_journal = legacy.with_suffix(".journal")
    n = 0
    try:
        with h5py.File(legacy, "r") as f:
            check_attrs(f, key, skip=("precision",))
            for start in range(0, len(f["sha256"]), SHARD_ROWS):
                rows = rows_of(f, slice(start, start + SHARD_ROWS))
                publish(rows)
                n += len(rows)
    except (BlockingIOError, PermissionError) as e:
        raise UserError(f"cannot open cache {legacy}: {e.strerror or e} (is another program holding it open "
                        f"for writing?)") from None
    except (OSError, KeyError, ValueError) as e:
        aside = legacy.with_name(f"{legacy.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(legacy, aside)
        print(f"featpipe: cache {legacy.name} is corrupt ({type(e).__name__}: {first_line(e)[:120]}); moved to "
              f"{aside.name}, rebuilding", file=sys.stderr)
    rows = Rows.concat(journal.read(format1_journal, key.dim), key.dim)
    publish(rows)
    print(f"featpipe: converted cache {legacy.name} (format 1, {n + len(rows)} rows) to format 2: "
          f"{key.name()}.h5 and its shards in {key.name()}/", file=sys.stderr)
    legacy.unlink(missing_ok=True)
    format1_journal.unlink(missing_ok=True)
    legacy.with_suffix(".lock").unlink(missing_ok=True)
