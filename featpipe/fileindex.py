"""Which files are unchanged since the last run, so that a warm re-run need not read and hash them again.

Like git's index: a file counts as unchanged when its size, inode, mtime and ctime all match what the last run
recorded with its sha256. Every write sets ctime to the current time, and no tool can set it back, so a changed
file is always read again. A file is only recorded when its ctime was RACY_SECONDS old as it was read: a write
in the same timestamp tick as that read cannot then hide. The index is JSON beside the caches (shared by every
backbone); losing or damaging it costs only hashing again.

A file that failed to decode keeps its reason in its record, so an unchanged corrupt file is reported again
without reading it (nor loading the model to find out). Reasons hold only for the decoders that gave them
(`decoders`: featpipe's and Pillow's versions and the --decoder asked for): after an upgrade, or with another
decoder, every such file is tried again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

INDEX_NAME = "files.json"
RACY_SECONDS = 2  # above any filesystem's timestamp granularity (FAT's is 2 s)
VERSION = 1


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


class FileIndex:
    def __init__(self, cache_dir: Path, decoders: str = "") -> None:
        self.path = Path(cache_dir) / INDEX_NAME
        self.decoders = decoders
        self.old = self._load()
        self.new: dict[str, list] = {}  # this run's records: [size, inode, mtime, ctime, sha256(, skip reason)]

    def _load(self) -> dict[str, list]:
        try:
            data = json.loads(self.path.read_text())
            files = data["files"] if data.get("version") == VERSION else {}
            if not isinstance(files, dict):
                return {}
            if data.get("decoders") != self.decoders:  # reasons from other decoders: try those files again
                files = {k: v[:5] if isinstance(v, list) else v for k, v in files.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
        return files

    def unchanged(self, path: Path, st: os.stat_result) -> str | None:
        """The sha256 recorded for this file if it is unchanged since then; kept for the next run too."""
        key = os.path.abspath(path)
        entry = self.old.get(key)
        if isinstance(entry, list) and len(entry) in (5, 6) and entry[:4] == _stamp(st) and \
                all(isinstance(x, str) for x in entry[4:]):
            self.new[key] = entry
            return entry[4]
        return None

    def failure(self, path: Path) -> str | None:
        """Why this file failed last time, if unchanged() just found it unchanged and it did fail."""
        entry = self.new.get(os.path.abspath(path))
        return entry[5] if entry and len(entry) == 6 else None

    def record_failure(self, path: Path, reason: str) -> None:
        """Keep why a recorded file could not be decoded (content-deterministic: same bytes, same decoders)."""
        key = os.path.abspath(path)
        if key in self.new:
            self.new[key] = [*self.new[key][:5], reason]

    def record(self, path: Path, st: os.stat_result, sha256: str, read_at_ns: int) -> None:
        """Remember a file hashed now; `st` was taken before reading it at `read_at_ns` (time.time_ns())."""
        if st.st_ctime_ns < read_at_ns - RACY_SECONDS * 1_000_000_000:
            self.new[os.path.abspath(path)] = [*_stamp(st), sha256]

    def save(self, root: Path) -> None:
        """Records of this run, plus the old ones outside `root` (files under it that this run missed are gone)."""
        inside = os.path.join(os.path.abspath(root), "")
        files = {k: v for k, v in self.old.items() if not k.startswith(inside)} | self.new
        if files == self.old:
            return  # a warm run over unchanged files writes nothing
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"version": VERSION, "decoders": self.decoders, "files": files}))
            os.replace(tmp, self.path)  # whole or not at all; concurrent runs: the last one wins
        except OSError:
            tmp.unlink(missing_ok=True)


def stat(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None
