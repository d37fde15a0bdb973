"""WebDataset shards as input: `.tar` files named by paths, brace patterns (`train-{000000..000099}.tar`) or globs,
streamed member by member (tarfile mode "r|": nothing extracted to disk, never a whole shard in memory). The standard
library's tarfile rather than the webdataset library: it raises at the byte where a shard is damaged, after every
member before it was delivered, which is what keeping those members needs.

Members group into samples as WebDataset groups them: by key, the member name up to the first dot of its basename
(`d/000123.jpg`, `d/000123.cls`, `d/000123.json`). A sample's image member (the rest of its name is an image type)
is embedded; its label is the text of its `cls` member (a class name, or an index as text), else the `label` of its
`json` member, else "" (unlabelled). A sample's path is `SHARD#MEMBER`, that of its image member."""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

from braceexpand import UnbalancedBracesError, braceexpand

from featpipe.dataset import MAX_FILE_BYTES
from featpipe.errors import UserError

SUFFIX = ".tar"
IMAGE_TYPES = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pnm")
LABEL_TYPES = ("cls", "json")
LABEL_BYTES = 1 << 20  # text about one image; a larger cls or json member is not a label


def is_shard(arg) -> bool:
    """A DATA_DIR argument that names .tar shards (a path, brace pattern or glob) rather than a folder."""
    return str(arg).lower().endswith(SUFFIX)


def shard_args(args: list | None) -> list[str] | None:
    """DATA_DIR arguments as shard patterns when they name .tar shards; None for one folder (or none)."""
    if not args or not any(is_shard(a) for a in args):
        if args and len(args) > 1:
            raise UserError(f"DATA_DIR is one folder, or one or more .tar shards; got {len(args)} arguments")
        return None
    other = next((a for a in args if not is_shard(a)), None)
    if other is not None:
        raise UserError(f"{other} is not a .tar shard: shards cannot be mixed with a folder")
    return [str(a) for a in args]


def expand(patterns: list[str]) -> list[Path]:
    """The shards `patterns` name, in the order given (a glob's matches sorted), each once. Braces are expanded here
    as well: the shell leaves a quoted pattern alone."""
    out, seen = [], set()
    for pattern in patterns:
        try:
            names = list(braceexpand(pattern))
        except UnbalancedBracesError:
            raise UserError(f"unbalanced braces in {pattern}") from None
        for path in (p for name in names for p in _matches(name, pattern)):
            if os.path.realpath(path) not in seen:  # overlapping patterns, or a link to a shard given too
                seen.add(os.path.realpath(path))
                out.append(Path(path))
    return out


def _matches(name: str, pattern: str) -> list[str]:
    found = sorted(glob.glob(name)) if glob.has_magic(name) else [name] if os.path.lexists(name) else []
    if not found:
        what = f"no shard matches {name}" if glob.has_magic(name) else f"shard not found: {name}"
        raise UserError(what + (f" (from {pattern})" if name != pattern else ""))
    not_file = next((p for p in found if not os.path.isfile(p)), None)
    if not_file is not None:
        raise UserError(f"shard {not_file} is not a file")
    return found


def member_path(shard: Path, member: str | None) -> str:
    """A sample's path: SHARD#MEMBER; the shard itself for what is said about all of it (its damaged tail)."""
    return str(shard) if member is None else f"{shard}#{member}"


@dataclass(frozen=True)
class Sample:
    member: str | None  # its image member's name (its key without one; None: the shard's damaged tail)
    label: str = ""
    data: bytes | None = None
    reason: str | None = None  # why it is skipped (data is None then)


def samples(shard: Path) -> Iterator[Sample]:
    """The shard's samples in tar order. A damaged shard (cut short, a garbled header) ends with a Sample(None)
    saying where: the samples before the damage are whole; the one being read when it came is not kept."""
    try:
        fh = open(shard, "rb")
    except OSError as e:
        yield Sample(None, reason=f"unreadable: {e.strerror or type(e).__name__}")
        return
    with fh:
        yield from _stream(fh)


def _stream(fh: IO[bytes]) -> Iterator[Sample]:
    group, kept = None, 0
    try:
        with tarfile.open(fileobj=fh, mode="r|") as tar:
            for m in tar:
                tar.members = []  # the stream keeps every header it read: memory would grow with the shard
                parts = split_name(m.name) if m.isreg() else None
                if parts is None:
                    continue
                if group is not None and (parts[0] != group.key or parts[1] in group.types):
                    yield from group.samples()
                    kept, group = kept + 1, None
                group = group or _Group(parts[0])
                group.add(parts[1], m, tar)
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError) as e:
        yield _damage(str(e) or type(e).__name__, group, kept)
        return
    if not _end_block_at(fh, end):  # tarfile ends quietly at a cut or garbled header: no end-of-archive block
        yield _damage(f"no end-of-archive block at byte {end}", group, kept)
    elif group is not None:
        yield from group.samples()


def _end_block_at(fh: IO[bytes], offset: int) -> bool:
    fh.seek(offset)
    return fh.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)


def _damage(what: str, group: "_Group | None", kept: int) -> Sample:
    lost = f" in sample {group.key}" if group is not None else ""
    return Sample(None, reason=f"damaged or truncated tar ({what}){lost}: the rest of the shard is not read; the "
                               f"{kept} sample(s) before it are kept")


def split_name(name: str) -> tuple[str, str] | None:
    """(key, type) as WebDataset splits a member name: `d/000123.seg.png` -> (`d/000123`, `seg.png`); None for a
    name it skips (no dot, or a basename starting with one)."""
    head, _, base = name.rpartition("/")
    stem, dot, kind = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{head}/{stem}" if head else stem), kind.lower()


@dataclass
class _Group:
    """The members of one sample read so far: the image's bytes and the label members' text only."""

    key: str
    types: set[str] = field(default_factory=set)
    images: list[tuple[str, bytes | None, str | None]] = field(default_factory=list)  # (member, data, reason)
    text: dict[str, bytes | None] = field(default_factory=dict)  # cls / json -> bytes (None: over LABEL_BYTES)

    def add(self, kind: str, m: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        self.types.add(kind)
        if kind in IMAGE_TYPES:
            too_large = self.images or m.size > MAX_FILE_BYTES  # a second image is named, never read
            reason = f"member too large ({m.size / 2**30:.1f} GiB)" if m.size > MAX_FILE_BYTES else None
            self.images.append((m.name, None if too_large else tar.extractfile(m).read(), reason))
        elif kind in LABEL_TYPES:
            self.text[kind] = tar.extractfile(m).read() if m.size <= LABEL_BYTES else None

    def samples(self) -> list[Sample]:
        if not self.images:
            return [Sample(self.key, reason=f"no image member ({', '.join(IMAGE_TYPES[:4])}, ...) in this sample")]
        (member, data, reason), *more = self.images
        label, why = _label(self.text)
        first = Sample(member, label, None if why or reason else data, why or reason)
        return [first] + [Sample(m, label, reason=f"a second image in sample {self.key}: only {member} is "
                                                  f"embedded") for m, _, _ in more]


def _label(text: dict[str, bytes | None]) -> tuple[str, str | None]:
    """(label, why the sample cannot be used): the cls member's text, else the json member's "label"."""
    kind = "cls" if "cls" in text else "json" if "json" in text else None
    if kind is None:
        return "", None
    if text[kind] is None:
        return "", f"{kind} member over {LABEL_BYTES >> 20} MiB"
    try:
        if kind == "cls":
            return text[kind].decode("utf-8").strip(), None
        value = json.loads(text[kind])
    except (UnicodeDecodeError, ValueError):
        return "", f"{kind} member is not {'UTF-8 text' if kind == 'cls' else 'JSON'}"
    if not isinstance(value, dict):
        return "", "json member is not an object"
    value = value.get("label", "")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return "", "json member's label is not text or an integer"
    return str(value).strip(), None
