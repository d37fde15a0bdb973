"""Feature sets: one backbone's cached embeddings, or several side by side, and the choice among them that
`--backbone auto` makes with the head's own inner CV (no backbone wins on every data set: bench/README.md).

A set is a tuple of parts: backbone names, or "name:flip" for that backbone's flip-averaged rows (--tta flip). Side
by side, each part's rows are scaled to unit length first, so none outweighs another by the scale or width of its
embeddings. The choice fits the logistic head on the training rows of every candidate (each part alone, each pair
of backbones, plain and flip-averaged) and keeps the one with the lowest log-loss its C search measured at its C
(inner folds, or past HeadConfig.holdout_rows its hold-out: the same rows for every candidate; ties: higher
accuracy, then the cheaper candidate). Log-loss, not accuracy: on a few hundred images the inner folds' accuracy
ties and jumps by single images, and picking the best of 20 such noisy scores chose worse sets (bench/README.md
"Feature sets" compares the rules). Past CHOOSE_ROWS training rows the candidates are compared on a stratified
sample of them and only the chosen set is fitted on all: comparing them then costs no more as the data grows.
Nothing here sees rows outside `rows`: an outer CV around choose() is nested.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

import numpy as np

from featpipe.errors import UserError
from featpipe.heads import Head, HeadConfig, accuracy, fit_head
from featpipe.splits import check_folds, kfold

AUTO = "auto"
FLIP = ":flip"  # a part "mobilenet_v2:flip": that backbone's embeddings averaged with the mirror image's (--tta)
CHOOSE_ROWS = 20_000  # above this many training rows, the candidates are compared on a sample this size
MIN_PER_CLASS = 5  # a sampled class keeps at least this many rows: enough for the C search's folds


def parts(backbone: str) -> tuple[str, ...]:
    """`--backbone a,b` -> ("a", "b") (their columns in that order); one name -> (name,); `auto` -> every registry
    backbone whose weights are on this machine, plain and flip-averaged (a one-line notice for each one left
    out)."""
    if backbone == AUTO:
        from featpipe import registry

        found = registry.offline_specs()
        for s in registry.REGISTRY.values():
            if s not in found:
                print(f"featpipe: auto leaves out {s.name}: its weights are not on this machine "
                      f"({s.install_hint})", file=sys.stderr)
        return tuple(s.name for s in found) + tuple(s.name + FLIP for s in found)
    names = tuple(n.strip() for n in backbone.split(","))
    if not all(names) or len(set(names)) < len(names):
        raise UserError(f"--backbone {backbone!r}: give one name, `auto`, or distinct names joined by commas")
    return names


def name(parts: tuple[str, ...]) -> str:
    return "+".join(parts)


def backbone_and_tta(part: str, tta: str = "none") -> tuple[str, str]:
    """"x:flip" -> ("x", "flip"); "x" -> ("x", tta): a plain name keeps the run's --tta."""
    return (part[:-len(FLIP)], "flip") if part.endswith(FLIP) else (part, tta)


def part_of(key) -> str:
    """The part name of a cache key (shards.CacheKey): its backbone, and ":flip" for flip-averaged rows."""
    return key.backbone + (FLIP if key.tta == "flip" else "")


def side_by_side(blocks: list[np.ndarray]) -> np.ndarray:
    """float32 (N, sum of widths): each block's rows at unit length, then concatenated."""
    if len(blocks) == 1:
        return blocks[0]
    out = np.empty((len(blocks[0]), sum(b.shape[1] for b in blocks)), np.float32)
    at = 0
    for b in blocks:
        unit_rows_into(out[:, at:at + b.shape[1]], b)
        at += b.shape[1]
    return out


def unit_rows_into(out: np.ndarray, block: np.ndarray, chunk: int = 65_536) -> None:
    """out[:] = block's rows scaled to unit length, a chunk of rows at a time (no temporary as large as block)."""
    for s in range(0, len(block), chunk):
        part = block[s:s + chunk]
        out[s:s + chunk] = part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


@dataclass
class Choice:
    parts: tuple[str, ...]
    head: Head
    tried: list[dict]  # per candidate: its set, inner-CV accuracy and log-loss at its C
    rows: int  # training rows the candidates were compared on (all of them up to max_rows)


def choose(blocks: dict[str, np.ndarray], y: np.ndarray, n_classes: int, cfg: HeadConfig,
           groups: np.ndarray | None, rows: np.ndarray, max_rows: int = CHOOSE_ROWS) -> Choice:
    """The best feature set for a logistic head on `rows` (see the module doc); blocks: part -> (N, dim)."""
    g = np.arange(len(y)) if groups is None else groups
    sample = sampled(y, rows, max_rows, cfg.seed)

    def fit(parts: tuple[str, ...]) -> tuple[tuple[str, ...], Head]:
        if len(sample) == len(rows):
            return parts, fit_head(matrix(blocks, parts), y, n_classes, cfg, g, rows)
        X = side_by_side([blocks[p][sample] for p in parts])  # the sample's rows only: never a copy of all rows
        return parts, fit_head(X, y[sample], n_classes, cfg, g[sample], np.arange(len(sample)))

    fitted = [fit(c) for c in candidates(list(blocks))]
    best, head = min(fitted, key=lambda ph: _rank(ph[1]))  # min keeps the first of equals: the cheaper set
    if len(sample) < len(rows):
        head = fit_head(matrix(blocks, best), y, n_classes, cfg, g, rows)
    tried = [dict(zip(("features", "inner_cv_accuracy", "inner_cv_log_loss"), (name(p), *inner_scores(h))))
             for p, h in fitted]
    return Choice(best, head, tried, len(sample))


def summary(choice: Choice) -> dict:
    """What --json and report.json say of a choice."""
    return {"tried": choice.tried, "chosen": name(choice.parts), "compared_on_rows": choice.rows}


def sampled(y: np.ndarray, rows: np.ndarray, max_rows: int, seed: int) -> np.ndarray:
    """`rows`, or past max_rows about that many of them: per class the same share, but never fewer than
    MIN_PER_CLASS rows (all of a smaller class), so no class is left out of the comparison or its C search."""
    rows = np.sort(rows)
    if len(rows) <= max_rows:
        return rows
    rng = np.random.default_rng(seed)
    by_class = rows[np.argsort(y[rows], kind="stable")]
    counts = np.bincount(y[rows])
    keep = [rng.choice(members, min(len(members), max(MIN_PER_CLASS, round(len(members) * max_rows / len(rows)))),
                       replace=False) for members in np.split(by_class, np.cumsum(counts)[:-1]) if len(members)]
    return np.sort(np.concatenate(keep))


def candidates(parts: list[str]) -> list[tuple[str, ...]]:
    """Every part alone, then every pair of plain backbones and the same pair flip-averaged: cheapest first."""
    plain = [p for p in parts if not p.endswith(FLIP)]
    pairs = list(itertools.combinations(plain, 2))
    flipped = [tuple(p + FLIP for p in pair) for pair in pairs if all(p + FLIP in parts for p in pair)]
    return [(p,) for p in parts] + pairs + flipped


def matrix(blocks: dict[str, np.ndarray], parts: tuple[str, ...]) -> np.ndarray:
    return side_by_side([blocks[p] for p in parts])


def nested_cv(blocks: dict[str, np.ndarray], y: np.ndarray, classes: list[str], k: int, cfg: HeadConfig,
              groups: np.ndarray | None = None) -> tuple[float, float, list[str]]:
    """Mean and std of held-out accuracy over K stratified folds, the whole choice made again on each fold's
    training rows; and the set each fold chose."""
    check_folds(y, classes, k, groups=groups)
    g = np.arange(len(y)) if groups is None else groups
    accs, picks = [], []
    for tr, te in kfold(y, k, cfg.seed, g):
        c = choose(blocks, y, len(classes), cfg, g, tr)
        accs.append(accuracy(c.head, matrix(blocks, c.parts), y, te))
        picks.append(name(c.parts))
    return float(np.mean(accs)), float(np.std(accs)), picks


def inner_scores(head: Head) -> tuple[float | None, float | None]:
    """(accuracy, log-loss) the C search measured at the chosen C; (None, None) when C was fixed, unscored."""
    s = head.report.get("c_search", {})
    if "values" not in s:
        return None, None
    i = int(np.argmin(np.abs(np.log(s["values"]) - np.log(s["chosen"]))))
    return s["accuracy"][i], s["log_loss"][i]


def _rank(head: Head) -> tuple[float, float]:
    acc, loss = inner_scores(head)
    return (0.0, 0.0) if acc is None else (loss, -acc)
