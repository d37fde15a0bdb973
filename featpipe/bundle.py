"""Model bundle: a directory you can copy anywhere and `featpipe predict` with. No pickle anywhere.

    bundle.json          what produced it (backbone, weights sha256, preprocessing, classes, head, metrics,
                         featpipe version) and the sha256 of every array file; `more_backbones` (same three
                         fields each, and `tta`) when the head reads several backbones' embeddings side by
                         side; `tta: "flip"` when a backbone's embeddings average each image with its mirror
    head.safetensors     the head's arrays (featpipe.heads.Head.arrays)
    backbone.safetensors optional: a fine-tuned backbone's full state dict (`"finetuned": true` in bundle.json);
                         predict loads it instead of the pretrained weights

Loading checks every listed file's sha256 first, so a tampered or truncated bundle is refused, never half-used.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from featpipe import __version__
from featpipe.dataset import describe
from featpipe.errors import UserError
from featpipe.heads import KINDS, Head
from featpipe.preprocess import Preprocessing
from featpipe.shards import can_write
from featpipe.weights import sha256_file

FORMAT = "featpipe-bundle"
FORMAT_VERSION = 1
MANIFEST = "bundle.json"
HEAD_FILE = "head.safetensors"
BACKBONE_FILE = "backbone.safetensors"


@dataclass
class Bundle:
    backbone: str
    weights_sha256: str  # of the pretrained weights the features came from
    preprocessing: Preprocessing
    classes: list[str]
    head: Head
    metrics: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # {"dir", "class_counts"}: what it was trained on
    finetuned: bool = False
    path: Path | None = None  # where it was loaded from
    # further backbones whose embeddings sit beside the first one's (feature_sets.py): backbone, weights_sha256,
    # preprocessing each; the head reads their rows side by side, in this order
    more: list[dict] = field(default_factory=list)
    tta: str = "none"  # "flip": the first backbone's embeddings are averaged with the mirror image's (extract --tta)

    def split(self) -> list["Bundle"]:
        """One single-backbone bundle per backbone, in column order: what predict embeds each part's rows with
        (each keeps the whole head: use it for embeddings, not for the head)."""
        return [self, *(replace(self, backbone=p["backbone"], weights_sha256=p["weights_sha256"],
                                preprocessing=p["preprocessing"], tta=p.get("tta", "none"), more=[])
                        for p in self.more)]


def save(bundle: Bundle, out: Path, backbone_state: dict | None = None) -> Path:
    """Write the array files, then bundle.json (atomically, last): a bundle.json present means a whole bundle."""
    from safetensors.numpy import save as head_bytes

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        # bytes written with open(): safetensors' own save_file makes 0600 files, whatever the umask
        (out / HEAD_FILE).write_bytes(head_bytes({k: np.ascontiguousarray(v) for k, v in bundle.head.arrays.items()}))
        files = {HEAD_FILE: sha256_file(out / HEAD_FILE)}
        if backbone_state is not None:
            from safetensors.torch import save as backbone_bytes

            (out / BACKBONE_FILE).write_bytes(backbone_bytes({k: v.contiguous() for k, v in backbone_state.items()}))
            files[BACKBONE_FILE] = sha256_file(out / BACKBONE_FILE)
        tmp = out / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(_manifest(bundle, files, backbone_state is not None), indent=2) + "\n")
        os.replace(tmp, out / MANIFEST)
    except OSError as e:
        raise UserError(f"cannot write model bundle {out}: {e.strerror or e}") from None
    return out


def output_dir(out: Path | None, name: str, data_dir: Path | None, force: bool) -> Path:
    """Where a training command writes its bundle (`--out`, else models/<name>), checked before any work: a bundle
    there trained on another data dir is not replaced without --force."""
    out = Path(out) if out is not None else Path("models") / name
    if not force:
        check_overwrite(out, describe(data_dir))
    if not can_write(out):  # before any work; the dir is made only with the bundle: a refused run leaves nothing
        raise UserError(f"cannot write model bundle {out}: it, or the folder it would go in, is not a writable "
                        f"directory")
    return out


def trained_on(out: Path) -> str | None:
    """The data dir a bundle at `out` records (None: no bundle there, or nothing readable to protect)."""
    try:
        return json.loads((Path(out) / MANIFEST).read_text()).get("data", {}).get("dir")
    except (OSError, ValueError, AttributeError):
        return None


def check_overwrite(out: Path, data_dir: str) -> None:
    old = trained_on(out)
    if old and old != data_dir:
        raise UserError(f"{out} holds a model trained on {old}, not {data_dir}; pass --force to replace it or "
                        f"--out to write elsewhere")


def _manifest(b: Bundle, files: dict[str, str], finetuned: bool) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "featpipe_version": __version__,
            "backbone": b.backbone, "weights_sha256": b.weights_sha256,
            "preprocessing": json.loads(b.preprocessing.to_json()), "classes": b.classes,
            "head": {"kind": b.head.kind, "params": b.head.params}, "metrics": b.metrics, "data": b.data,
            "finetuned": finetuned, "files": files, **({} if b.tta == "none" else {"tta": b.tta}),
            **({"more_backbones": [p | {"preprocessing": json.loads(p["preprocessing"].to_json())} for p in b.more]}
               if b.more else {})}


def load(path: Path) -> Bundle:
    """Read and verify a bundle directory (or its bundle.json); any defect -> UserError naming it."""
    path = Path(path)
    root = path.parent if path.name == MANIFEST else path
    m = _read_manifest(root)
    try:
        for name, digest in m["files"].items():
            _verify(root, name, digest)
        if HEAD_FILE not in m["files"]:
            raise UserError(f"model bundle {root} is incomplete: bundle.json does not list its array files")
        if (BACKBONE_FILE in m["files"]) != (m.get("finetuned") is True):
            raise UserError(f"model bundle {root}: bundle.json's finetuned ({m.get('finetuned')!r}) and its files "
                            f"({', '.join(sorted(m['files']))}) disagree")
        classes = m["classes"]
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
                and len(set(classes)) == len(classes) >= 2):
            raise UserError(f"model bundle {root}: classes must be a list of at least 2 distinct names")
        head = Head(m["head"]["kind"], _read_arrays(root / HEAD_FILE), m["head"].get("params", {}))
        pre = Preprocessing.from_json(json.dumps(m["preprocessing"]))
        more = [{"backbone": str(p["backbone"]), "weights_sha256": str(p["weights_sha256"]),
                 "preprocessing": Preprocessing.from_json(json.dumps(p["preprocessing"])),
                 "tta": _tta(p.get("tta", "none"), root)} for p in m.get("more_backbones", [])]
        bundle = Bundle(m["backbone"], m["weights_sha256"], pre, classes, head, m.get("metrics", {}),
                        m.get("data", {}), m.get("finetuned") is True, root, more, _tta(m.get("tta", "none"), root))
        if more and bundle.finetuned:
            raise UserError(f"model bundle {root}: a fine-tuned backbone with more_backbones is not readable")
    except KeyError as e:
        raise UserError(f"model bundle {root}: bundle.json lacks {e}") from None
    except (TypeError, AttributeError, ValueError) as e:
        raise UserError(f"model bundle {root}: bundle.json has a malformed field ({e})") from None
    _check_head(bundle)
    return bundle


def _tta(value, root: Path) -> str:
    if value not in ("none", "flip"):
        raise UserError(f"model bundle {root}: tta {value!r} is not one this featpipe knows (none, flip)")
    return value


def _read_manifest(root: Path) -> dict:
    try:
        m = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"not a model bundle: {root} (no {MANIFEST}; make one with `featpipe fit-head`)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"model bundle {root}: cannot read {MANIFEST}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"not a model bundle: {root / MANIFEST} (format is not {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(f"model bundle {root} has format_version {m.get('format_version')!r}; this featpipe reads "
                        f"{FORMAT_VERSION}")
    return m


def _verify(root: Path, name: str, digest: str) -> None:
    if Path(name).name != name:
        raise UserError(f"model bundle {root}: file name {name!r} is not a plain name")
    try:
        got = sha256_file(root / name)
    except OSError as e:
        raise UserError(f"model bundle {root}: cannot read {name}: {e.strerror or e}") from None
    if got != digest:
        raise UserError(f"model bundle {root}: {name} is corrupt or was modified (sha256 {got[:12]}…, bundle.json "
                        f"says {digest[:12]}…)")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # the hash matched, so this is a bundle written wrong, not damaged later
        raise UserError(f"model bundle: cannot read {path.name}: {e}") from None


def _check_head(b: Bundle) -> None:
    """Shapes agree with each other and with the class list, so predict never fails half way."""
    a, kind = b.head.arrays, b.head.kind
    need = {"mean", "scale", "w1", "b1"} | ({"w2", "b2"} if kind == "mlp" else set())
    if kind not in KINDS or not need <= a.keys():
        raise UserError(f"model bundle {b.path}: head kind {kind!r} with arrays {sorted(a)} is not readable")
    last_w, last_b = (a["w2"], a["b2"]) if kind == "mlp" else (a["w1"], a["b1"])
    dim = a["mean"].shape[0]
    ok = (a["scale"].shape == (dim,) and a["w1"].shape[1] == dim and a["b1"].shape == (a["w1"].shape[0],)
          and last_w.shape[0] == len(b.classes) == last_b.shape[0])
    if kind == "mlp":
        ok = ok and a["w2"].shape[1] == a["w1"].shape[0]
    if not ok:
        raise UserError(f"model bundle {b.path}: head array shapes do not fit together or the {len(b.classes)} "
                        f"classes")

