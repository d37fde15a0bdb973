"""The experiment's outputs: report.json (everything), report.md (the table), report.png, confusion.png.

The markdown is rendered from the same dict that report.json holds, so the two can never disagree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from featpipe.errors import UserError

MARKERS = {"scratch": "^", "head": "o", "finetune": "s"}
HOW_FITTED = {"logistic": "C chosen by inner CV", "mlp": "early stopping on an inner split"}


def write(report: dict, out: Path) -> dict:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create report dir {out}: {e.strerror or e}") from None
    report["files"] = {name: str(out / name) for name in ("report.json", "report.md", "report.png", "confusion.png")}
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "report.png")
    plot_confusion(report, out / "confusion.png")
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    return report


def fmt_acc(r: dict, key: str) -> str:
    return "—" if r.get(key) is None else f"{r[key]:.3f}"


def table(report: dict) -> str:
    lines = ["| method | backbone | train acc | val acc | training time | speed-up vs scratch |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in report["results"]:
        val = fmt_acc(r, "val_accuracy")
        if r.get("cv_accuracy_mean") is not None:
            val += f" ({r['cv_folds']}-fold CV {r['cv_accuracy_mean']:.3f} ± {r['cv_accuracy_std']:.3f})"
        speed = "—" if r.get("speedup_vs_scratch") is None else f"{r['speedup_vs_scratch']:.2f}x"
        lines.append(f"| {r['method']} | {r['backbone']} | {fmt_acc(r, 'train_accuracy')} | {val} | "
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


def markdown(report: dict) -> str:
    d, t = report["dataset"], report["timings"]
    one_time = ", ".join(f"{k}: extract {v['extract_seconds']:.1f} s, decode {v['decode_seconds']:.1f} s"
                         for k, v in t["one_time"].items())
    best = report["best"]
    met = [f"{r['method']}/{r['backbone']}" for r in report["results"] if r["meets_tutorial_task"]]
    parts = [
        "# featpipe experiment", "",
        f"{sum(d['images_per_class'].values())} images, {len(d['classes'])} classes "
        f"({', '.join(f'{c} {n}' for c, n in d['images_per_class'].items())}); {d['n_train']} train / "
        f"{d['n_val']} val (stratified, seed {report['config']['seed']}). Device: {report['device']}, featpipe "
        f"{report['featpipe_version']}.", "",
        table(report), "",
        "Training time excludes one-time work shared by the methods (" + one_time + "); the head's time is its fit "
        f"({HOW_FITTED[report['config']['head']]}), fine-tune's includes a fit of the same head (its warm start) "
        "plus its epochs. Speed-up = scratch's training time / this row's, same backbone.", "",
        *verdicts(report),
        f"- Always answering the largest class scores {d['majority_val_accuracy']:.3f} on val: a row at or below that "
        f"has learned nothing usable yet.", "",
        f"Best on validation: {best['method']} / {best['backbone']} ({best['val_accuracy']:.3f}). Tutorial task "
        f"(val ≥ 0.80 in under 30 min, training only the last layers) met by: {', '.join(met) or 'none'}.", "",
        f"Total wall time {t['total_seconds']:.1f} s.", "",
    ]
    return "\n".join(parts)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = {b: f"C{i}" for i, b in enumerate(report["backbones"])}
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


def plot_confusion(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best, classes = report["best"], report["dataset"]["classes"]
    m = best["confusion"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(m, cmap="Blues")
    top = max(max(row) for row in m)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{best['method']} / {best['backbone']}: val accuracy {best['val_accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
