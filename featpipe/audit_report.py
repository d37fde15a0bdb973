"""The audit's files: audit.json (everything), audit.md (the summary), map.png (the embeddings in 2-D, coloured by
class, flagged images marked) and audit.html (one self-contained page: thumbnails of every flagged set, and each
suspected label error beside the closest images of its given and its suggested class)."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from featpipe.dataset import as_text, json_safe
from featpipe.features import Features
from featpipe.neighbours import unit

SHOWN = 50  # sets, leaks and label issues per section of audit.md and audit.html (audit.json has them all)
THUMB = 128  # thumbnail side, pixels
NEIGHBOURS = 3  # images of the given and of the suggested class shown beside a suspected label error
TSNE_ROWS = 5000  # t-SNE up to here (seconds); PCA above (any size)


def write(out: Path, report: dict, f: Features) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    files = {name: str(out / name) for name in ("audit.json", "audit.md", "map.png", "audit.html")}
    plot_map(f, flagged(report), out / "map.png")
    (out / "audit.md").write_text(markdown(report))
    (out / "audit.html").write_text(page(report, f, out / "map.png"))
    (out / "audit.json").write_text(json.dumps(json_safe(report | {"files": files}), indent=1) + "\n")
    return files


def flagged(report: dict) -> set[str]:
    paths = {p for s in report["duplicates"] for p in s["paths"]} | {i["path"] for i in report["label_issues"]}
    return paths | {leak["train"] for leak in report["leaks"]}


def markdown(report: dict) -> str:
    cv = report["cv"]
    leaks = (f"- leaks into {report['test_dir']}: {len(report['leaks'])}" if report["test_dir"]
             else "- leaks: no --test-dir given")
    lines = [f"# Audit of {_md(report['data_dir'])} ({report['images']} images, {report['backbone']})", "",
             f"- duplicate sets: {len(report['duplicates'])} (exact: same bytes; near: cosine >= "
             f"{report['near_threshold']}), {sum(s['across_classes'] for s in report['duplicates'])} across classes",
             leaks, f"- likely label errors: {len(report['label_issues'])}",
             f"- {cv['folds']}-fold accuracy: {_acc(cv['ungrouped'])} with every file its own group, "
             f"{_acc(cv['grouped'])} with each duplicate set in one fold", *(f"- {n}" for n in report["notes"]),
             "", "![map](map.png)", "", "## Duplicate sets", "",
             "| kind | min cosine | files (class) |", "| --- | ---: | --- |"]
    lines += [f"| {s['kind']} | {s['min_cosine']:.3f} | "
              + "<br>".join(f"{_md(p)} ({_md(c)})" for p, c in zip(s["paths"], s["labels"])) + " |"
              for s in report["duplicates"][:SHOWN]]
    lines += ["", "## Leaks", "", "| kind | cosine | test | train |", "| --- | ---: | --- | --- |"]
    lines += [f"| {x['kind']} | {x['cosine']:.3f} | {_md(x['test'])} | {_md(x['train'])} |"
              for x in report["leaks"][:SHOWN]]
    lines += ["", "## Likely label errors", "", "| score | given | suggested | file |", "| ---: | --- | --- | --- |"]
    lines += [f"| {i['score']:.3f} | {_md(i['given'])} | {_md(i['suggested'])} | {_md(i['path'])} |"
              for i in report["label_issues"][:SHOWN]]
    return "\n".join(lines) + "\n"


def _acc(a: dict | None) -> str:
    return "n/a" if a is None else f"{a['mean']:.3f} ± {a['std']:.3f}"


def plot_map(f: Features, marked: set[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = layout(f.X)
    fig, ax = plt.subplots(figsize=(8, 7))
    for c, name in enumerate(f.classes):
        rows = f.y == c
        ax.scatter(xy[rows, 0], xy[rows, 1], s=8, alpha=0.7, label=name)
    hit = np.array([p in marked for p in f.paths])
    ax.scatter(xy[hit, 0], xy[hit, 1], s=40, facecolors="none", edgecolors="black", linewidths=1, label="flagged")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{len(f.y)} images, {int(hit.sum())} flagged ({'t-SNE' if len(f.y) <= TSNE_ROWS else 'PCA'})")
    ax.legend(fontsize=7, markerscale=2, loc="best", ncol=1 + len(f.classes) // 12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def layout(x: np.ndarray) -> np.ndarray:
    """2-D positions: t-SNE (sklearn) where it takes seconds, else PCA."""
    x = unit(x)
    if len(x) < 4:
        return np.zeros((len(x), 2))
    if len(x) <= TSNE_ROWS:
        from sklearn.manifold import TSNE

        return TSNE(perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=0).fit_transform(x)
    from sklearn.decomposition import PCA

    return PCA(2, random_state=0).fit_transform(x)


def page(report: dict, f: Features, map_png: Path) -> str:
    """The page, its images inside it (map_png too): it travels as one file."""
    src = "data:image/png;base64," + base64.b64encode(map_png.read_bytes()).decode()
    body = [f"<h1>Audit of {_h(report['data_dir'])}</h1>", f'<p><img src="{src}" width="640"></p>',
            "<h2>Duplicate sets</h2>"]
    for s in report["duplicates"][:SHOWN]:
        body.append(_row(f"{s['kind']}, min cosine {s['min_cosine']:.3f}", zip(s["paths"], s["labels"])))
    body.append("<h2>Leaks</h2>")
    for x in report["leaks"][:SHOWN]:
        body.append(_row(f"{x['kind']}, cosine {x['cosine']:.3f}", [(x["test"], "test"), (x["train"], "train")]))
    body.append("<h2>Likely label errors</h2>")
    index = {p: i for i, p in enumerate(f.paths)}
    for i in report["label_issues"][:SHOWN]:
        near = [(p, f"{i['given']} (given)") for p in _closest(f, index[i["path"]], i["given"])]
        near += [(p, f"{i['suggested']} (suggested)") for p in _closest(f, index[i["path"]], i["suggested"])]
        body.append(_row(f"score {i['score']:.3f}: filed as {i['given']}, looks like {i['suggested']}",
                         [(i["path"], "this image")] + near))
    style = ("body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:4px;width:%dpx;"
             "font-size:11px;word-break:break-all}.set{border-top:1px solid #ccc;padding:6px 0}" % THUMB)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>featpipe audit</title><style>{style}"
            f"</style></head><body>{''.join(body)}</body></html>\n")


def _closest(f: Features, row: int, label: str) -> list[str]:
    """The images filed under `label` most similar to this row (itself left out)."""
    rows = np.flatnonzero((f.y == f.classes.index(label)) & (np.arange(len(f.y)) != row))
    cos = unit(f.X[rows]) @ unit(f.X[row:row + 1])[0]
    return [f.paths[r] for r in rows[np.argsort(-cos)[:NEIGHBOURS]]]


def _row(title: str, images) -> str:
    figures = "".join(f"<figure><img src='{_thumb(p)}' alt='{_h(p)}'><figcaption>{_h(caption)}"
                      f"<br>{_h(Path(p).name)}</figcaption></figure>" for p, caption in images)
    return f"<div class='set'><p>{_h(title)}</p>{figures}</div>"


def _thumb(path: str) -> str:
    """A data: URI JPEG thumbnail (the page travels as one file); an unreadable file gets an empty image."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.draft("RGB", (2 * THUMB, 2 * THUMB))  # a large JPEG decodes scaled down, not whole
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except (OSError, Image.DecompressionBombError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _h(text: str) -> str:
    return html.escape(as_text(text))


def _md(text: str) -> str:
    return as_text(text).replace("|", "\\|")
