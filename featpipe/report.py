"""The experiment's outputs: report.json (everything), report.md (the table), report.png, confusion.png.

The markdown is rendered from the same dict that report.json holds, so the two can never disagree. It links each
row's saved model bundle (paths relative to the report dir) and, past PAIRS_ABOVE classes, lists the best model's
most confused pairs, since confusion.png (sized to the class count) is then too dense to read numbers from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from featpipe.errors import UserError

MARKERS = {"scratch": "^", "head": "o", "finetune": "s"}
HOW_FITTED = {"logistic": "C chosen by inner CV", "mlp": "early stopping on an inner split"}
PAIRS_ABOVE = 30  # classes: past this the confusion plot's cells are too small to read, so report.md lists pairs
TOP_PAIRS = 10


def write(report: dict, out: Path) -> dict:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report dir {out}: {e.strerror or e}") from None
    report["files"] = {name: str(out / name) for name in ("report.json", "report.md", "report.png", "confusion.png")}
    (out / "report.md").write_text(markdown(report, out))
    plot(report, out / "report.png")
    best = report["best"]
    plot_confusion(best["confusion"], report["dataset"]["classes"], f"{best['method']} / {best['backbone']}: val "
                   f"accuracy {best['val_accuracy']:.3f}", out / "confusion.png")
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    return report


def fmt_acc(r: dict, key: str) -> str:
    return "—" if r.get(key) is None else f"{r[key]:.3f}"


def table(report: dict) -> str:
    test = any("test_accuracy" in r for r in report["results"])  # a --test-dir: scored once, chose nothing
    lines = ["| method | backbone | train acc | val acc | " + ("test acc | " if test else "") + "training time | "
             "speed-up vs scratch |", "| --- " * (7 if test else 6) + "|"]
    for r in report["results"]:
        val = fmt_acc(r, "val_accuracy")
        if r.get("cv_accuracy_mean") is not None:
            val += f" ({r['cv_folds']}-fold CV {r['cv_accuracy_mean']:.3f} ± {r['cv_accuracy_std']:.3f})"
        speed = "—" if r.get("speedup_vs_scratch") is None else f"{r['speedup_vs_scratch']:.2f}x"
        tested = f"{fmt_acc(r, 'test_accuracy')} | " if test else ""
        chosen = f" ({r['feature_sets']['chosen']})" if "feature_sets" in r else ""  # auto's choice
        lines.append(f"| {r['method']} | {r['backbone']}{chosen} | {fmt_acc(r, 'train_accuracy')} | {val} | {tested}"
                     f"{r['train_seconds']:.2f} s | {speed} |")
    return "\n".join(lines)


def verdicts(report: dict) -> list[str]:
    """Per backbone: did the fine-tuning epochs beat the head they started from, on validation?

    Compared with fine-tune's own epoch 0 (the warm-started head scored through the same decode and bf16 forward),
    so decode/numeric differences from the cached-feature head row are not mistaken for a gain."""
    by = {(r["method"], r["backbone"]): r for r in report["results"]}
    n_val = report["dataset"]["n_val"]
    out = []
    for backbone in report["backbones"]:
        head, ft = by.get(("head", backbone)), by.get(("finetune", backbone))
        if not (head and ft):
            continue
        start = ft["history"][0]["val_accuracy"]
        n = round((ft["val_accuracy"] - start) * n_val)
        if ft["best_epoch"] == 0 or n == 0:
            verdict = (f"did not help: no epoch beat the warm-started head it began from (val {start:.3f}), so the "
                       f"kept checkpoint is that head")
        else:
            verdict = (f"helped: val {start:.3f} -> {ft['val_accuracy']:.3f} ({n} more of {n_val} val images right"
                       + (", within noise on a val set this small)" if n == 1 else ")"))
        aside = "" if head["val_accuracy"] == start else (
            f" (the head row's {head['val_accuracy']:.3f} scores that head on the cached features from the extractor's "
            f"forward; on the same pixels the training model's forward differs slightly in floating point, enough to "
            f"flip a borderline image)")
        out.append(f"- Fine-tuning {backbone} {verdict}; {ft['train_seconds']:.1f} s vs {head['train_seconds']:.2f} s "
                   f"of training{aside}.")
    return out


def auto_lines(report: dict) -> list[str]:
    """The `--backbones auto` row: which feature set it chose among how many, on how many rows, and what its extract
    runs took (the flip-averaged rows are extracted once, then cached like any other)."""
    out = []
    for r in report["results"]:
        if "feature_sets" in r:
            fs, spent = r["feature_sets"], sum(r["extract_seconds"].values())
            on = "" if fs["compared_on_rows"] == r["n_train"] else f" of a {fs['compared_on_rows']:,}-row sample"
            again = "; its CV makes the choice again per fold" if r.get("cv_folds") else ""
            out.append(f"- head / {r['backbone']} chose {fs['chosen']} among {len(fs['tried'])} feature sets (the "
                       f"lowest log-loss in the C search on the training rows{on}{again}); their extract runs took "
                       f"{spent:.1f} s.")
    return out


def markdown(report: dict, out: Path = Path(".")) -> str:
    """`out`: the report dir, which the model links are relative to."""
    d, t = report["dataset"], report["timings"]
    one_time = ", ".join(f"{k}: extract {v['extract_seconds']:.1f} s, check the files {v['prepare_seconds']:.1f} s"
                         for k, v in t["one_time"].items())
    best = report["best"]
    met = [f"{r['method']}/{r['backbone']}" for r in report["results"] if r["meets_tutorial_task"]]
    parts = [
        "# featpipe experiment", "",
        f"{sum(d['images_per_class'].values())} images, {len(d['classes'])} classes "
        f"({', '.join(f'{c} {n}' for c, n in d['images_per_class'].items())}); {d['n_train']} train / "
        f"{d['n_val']} val ({d.get('validation', 'random split')}, seed {report['config']['seed']}). Device: "
        f"{report['device']}, featpipe "
        f"{report['featpipe_version']}.", "",
        table(report), "",
        "Training time excludes one-time work shared by the methods (" + one_time + "); the head's time is its fit "
        f"({HOW_FITTED[report['config']['head']]}), fine-tune's includes a fit of the same head (its warm start) "
        "plus its epochs. Speed-up = scratch's training time / this row's, same backbone.", "",
        *verdicts(report), *auto_lines(report),
        f"- Always answering the largest class scores {d['majority_val_accuracy']:.3f} on val: a row at or below that "
        f"has learned nothing usable yet.", "",
        f"Best on validation: {best['method']} / {best['backbone']} ({best['val_accuracy']:.3f})"
        f"{_saved_as(best, out)}. Tutorial task (val ≥ 0.80 in under 30 min, training only the last layers) met by: "
        f"{', '.join(met) or 'none'}.", "",
        *models(report, out), *confused_pairs(report),
        f"Total wall time {t['total_seconds']:.1f} s.", "",
    ]
    return "\n".join(parts)


def _link(path: str, out: Path) -> str:
    rel = os.path.relpath(path, out)  # relative: the report dir can be moved or shared with its models
    return f"[{rel}]({rel})"


def _saved_as(row: dict, out: Path) -> str:
    return f", saved as {_link(row['model_path'], out)}" if row.get("model_path") else ""


def models(report: dict, out: Path) -> list[str]:
    """One line linking every saved model bundle (each row's), for `featpipe predict MODEL IMAGES`."""
    links = [f"{r['method']} / {r['backbone']} {_link(r['model_path'], out)}" for r in report["results"]
             if r.get("model_path")]
    return [f"Models (`featpipe predict MODEL IMAGES...`): {'; '.join(links)}.", ""] if links else []


def top_confusions(m: list[list[int]], classes: list[str], k: int = TOP_PAIRS) -> list[tuple[str, str, int]]:
    """The k largest off-diagonal cells as (true, predicted, count); ties in class order."""
    cells = [(-v, i, j) for i, row in enumerate(m) for j, v in enumerate(row) if i != j and v > 0]
    return [(classes[i], classes[j], -v) for v, i, j in sorted(cells)[:k]]


def confused_pairs(report: dict) -> list[str]:
    """Above PAIRS_ABOVE classes: the best model's most confused pairs as a table (confusion.png is too dense)."""
    classes, best = report["dataset"]["classes"], report["best"]
    if len(classes) <= PAIRS_ABOVE:
        return []
    pairs = top_confusions(best["confusion"], classes)
    head = f"Most confused pairs on validation ({best['method']} / {best['backbone']}, {len(classes)} classes):"
    if not pairs:
        return [head + " none, every validation image is right.", ""]
    return [head, "", "| true | predicted | images |", "| --- | --- | --- |",
            *(f"| {t} | {p} | {n} |" for t, p, n in pairs), ""]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(r["backbone"] for r in report["results"]))}
    for r in report["results"]:
        ax.scatter(max(r["train_seconds"], 1e-3), r["val_accuracy"], marker=MARKERS[r["method"]], s=70,
                   color=colors[r["backbone"]], label=f"{r['method']} / {r['backbone']}")
    ax.set_xscale("log")
    ax.set_xlabel("training wall time (s, log scale; one-time extraction excluded)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.axhline(0.80, color="grey", linestyle=":", linewidth=1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: never hides a point
    ax.set_title(f"Accuracy vs training time ({report['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_layout(classes: list[str]) -> tuple[float, float]:
    """(font size in points, figure side in inches): each class gets a row tall enough for its tick label at that
    size, plus room for the longest label; 5 classes keep the old 5.5-inch figure."""
    n = len(classes)
    font = max(6.0, min(10.0, 10.0 - (n - 10) / 10))
    cell = 2.0 * font / 72  # a tick label is ~1.2 font sizes tall: ample gap, and room for a 3-digit count
    label = max(map(len, classes)) * 0.62 * font / 72
    return font, max(5.5, n * cell + label + 1.2)


def confusion_figure(m: list[list[int]], classes: list[str], title: str):
    """A confusion matrix (rows: true class) as a matplotlib Figure, sized to the class count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    font, side = confusion_layout(classes)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(m, cmap="Blues")
    top = max(max(row) for row in m)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            if v or len(classes) <= PAIRS_ABOVE:  # many classes: zeros are noise
                ax.text(j, i, str(v), ha="center", va="center", fontsize=font,
                        color="white" if v > top / 2 else "black")
    many = len(classes) > 10  # upright-rotated labels stack without overlap however many there are
    ax.set_xticks(range(len(classes)), classes, rotation=90 if many else 45, ha="center" if many else "right",
                  fontsize=font)
    ax.set_yticks(range(len(classes)), classes, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_confusion(m: list[list[int]], classes: list[str], title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = confusion_figure(m, classes, title)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # never clips a long label or the title
    plt.close(fig)
