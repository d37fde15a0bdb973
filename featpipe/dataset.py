"""ImageFolder discovery: DATA_DIR/<class>/<image> (or a flat folder of unlabelled images), and the shipped
default dataset."""

from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from featpipe.errors import UserError

SHIPPED_NAME = "gcompris-photos"
MAX_FILE_BYTES = 1 << 30  # far above any decodable image (Pillow's pixel limit), far below a video's size
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}  # only for that warning
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "dev", "eval"}


def shipped_dataset() -> Path:
    """The 196-photo, 5-class CC0 set inside the package, so the demo needs no user data."""
    return Path(str(resources.files("featpipe") / "data" / SHIPPED_NAME))


def describe(root: Path | None) -> str:
    """What a model was trained on, as bundle.json records it: the data dir's absolute path, or the shipped set
    by name (its path differs between installs)."""
    return f"shipped:{SHIPPED_NAME}" if root is None else os.path.realpath(root)


@dataclass(frozen=True, slots=True)  # no __dict__: a 10^7-file listing holds one per file
class ImageFile:
    path: str  # as pathlib prints it; a str, not a Path: a Path object costs its string again, twice over
    label: str


def scan(root: Path | None, labelled: bool = True) -> tuple[Path, list[ImageFile], list[str]]:
    """List every regular file under each class folder (sorted, deterministic). With labelled=False a folder
    without class folders is a set of unlabelled images (every file under it, label "").

    Files are not filtered by extension: the extractor decides what is an image by its bytes and reports the rest.
    Returns (root, files, classes).
    """
    root = shipped_dataset() if root is None else Path(root)
    classes = class_folders(root)
    if not classes:
        files = [] if labelled else _walk(root, "")
        if not files:
            raise UserError(f"no class folders in {root}: training and evaluation need DATA_DIR/<class>/<image>"
                            + ("" if labelled else "; and no files to embed unlabelled either"))
        return root, files, []
    _refuse_split_parent(root, classes)
    loose = [e.name for e in _entries(root) if not _is_dir(e) and Path(e.name).suffix.lower() in IMAGE_SUFFIXES]
    if loose:  # an image beside the class folders has no class: say so rather than drop it unseen (a README not)
        print(f"featpipe: {len(loose)} image file(s) at the top of {root} ignored (e.g. {loose[0]}): with class "
              f"folders there, only the files inside them count", file=sys.stderr)
    return root, [f for cls in classes for f in _walk(root / cls, cls)], classes


def class_folders(root: Path) -> list[str]:
    """The class folder names of a data dir (one listing, not a walk); checks that it is a directory."""
    if not root.exists():
        raise UserError(f"data directory not found: {root}")
    if not root.is_dir():
        raise UserError(f"not a directory: {root} (expected DATA_DIR/<class>/<image>)")
    return sorted(d.name for d in _entries(root) if _is_dir(d) and not d.name.startswith("."))


def require_labels(root: Path | None) -> None:
    """Training commands: refuse a folder without class folders before any image is embedded."""
    root = shipped_dataset() if root is None else Path(root)
    if not class_folders(root):
        raise UserError(f"no class folders in {root}: training needs DATA_DIR/<class>/<image> (featpipe extract "
                        f"embeds a folder of unlabelled images)")


def _walk(folder: Path, label: str) -> list[ImageFile]:
    files, top = [], os.fspath(folder)
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        where = dirpath[2:] if top == "." else dirpath  # pathlib's names: "x.jpg", "sub/x.jpg", not "./x.jpg"
        files += [ImageFile(os.path.join(where, n), label) for n in sorted(filenames) if not n.startswith(".")]
    return files


def _refuse_split_parent(root: Path, classes: list[str]) -> None:
    """`data/` holding train/ val/ test/ would train a 3-class model "train/test/val" without a word."""
    splits = [c for c in classes if c.lower() in SPLIT_NAMES
              and any(_is_dir(e) and not e.name.startswith(".") for e in _entries(root / c))]
    if len(splits) >= 2 or (splits and len(splits) == len(classes)):  # a real class may be named "train"
        first = next((c for c in splits if c.lower().startswith("train")), splits[0])
        raise UserError(f"{root} holds split folders ({', '.join(splits)}), not class folders: pass "
                        f"{root / first} as DATA_DIR (its subfolders are the classes)")


def require_every_class(root: Path, classes: list[str], present: set[str], skipped: list[dict] = ()) -> None:
    """A class with no usable image would silently vanish from every model: refuse."""
    if empty := empty_classes(root, classes, present, skipped):
        raise UserError(empty)


def empty_classes(root: Path, classes: list[str], present: set[str], skipped: list[dict] = ()) -> str | None:
    """Which class folders have no usable image, and (from `skipped`, extract's list) why its files were not used;
    None when every class has one."""
    empty = sorted(set(classes) - present)
    if not empty:
        return None
    folder = root / empty[0]
    inside = [s for s in skipped if Path(s["path"]).is_relative_to(folder)]
    why = f"; {len(inside)} file(s) skipped, e.g. {Path(inside[0]['path']).name}: {inside[0]['reason']}" \
        if inside else ""
    more = f" (and {len(empty) - 1} more such folders)" if len(empty) > 1 else ""
    return f"class folder {folder} has no valid image{why}{more}"


def _is_dir(entry: os.DirEntry) -> bool:
    """A symlink loop or a link into an unreadable place is not a class folder (is_dir() raises for them)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _entries(root: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(root) as it:
            return list(it)
    except PermissionError as e:
        raise UserError(f"cannot read data directory {root}: {e.strerror}") from None


def read_file(f: ImageFile, st: os.stat_result | None = None) -> tuple[bytes | None, str | None]:
    """The file's bytes, or why not. Only regular files are opened: a named pipe would block forever and a link
    to /dev/zero would read until memory ran out. Files over MAX_FILE_BYTES (a video, a disk image) are not read.
    `st`: the file's stat if the caller took one already."""
    try:
        st = st or os.stat(f.path)
        if not stat.S_ISREG(st.st_mode):
            return None, "not a regular file"
        if st.st_size > MAX_FILE_BYTES:
            return None, f"file too large ({st.st_size / 2**30:.1f} GiB; images are read whole)"
        with open(f.path, "rb") as fh:
            return fh.read(), None
    except OSError as e:
        return None, f"unreadable: {e.strerror or type(e).__name__}"


def as_text(name: str) -> str:
    """A file name as text others can read: as it is when it is UTF-8, else its bytes percent-encoded (Linux names
    may be any bytes; Python holds the others as lone surrogates; urllib.parse.unquote_to_bytes gives them back)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        from urllib.parse import quote

        return quote(name.encode("utf-8", "surrogateescape"), safe="/")
    return name


def json_safe(obj):
    """obj with every string as_text: strict JSON readers reject the lone surrogates of a non-UTF-8 file name."""
    if isinstance(obj, str):
        return as_text(obj)
    if isinstance(obj, dict):
        return {json_safe(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj
