"""How `--backbone auto` should pick: selection rules compared on one table of fits (how the rule in
featpipe/feature_sets.py was chosen; bench/README.md "Feature sets").

    python bench/feature_rules.py [--sets photos,icons,digits] [--seeds 0,1,2] [--json OUT.json]

For every set, seed and outer fold (5, as bench/feature_sets.py), the logistic head is fitted on the training rows
of every candidate (feature_sets.candidates: each part alone, each pair plain and flip-averaged) and its inner-CV
accuracy and log-loss and its outer-fold accuracy recorded once; each rule then picks per fold from that table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import featpipe  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import numpy as np

from featpipe import feature_sets
from featpipe.heads import HeadConfig, accuracy, fit_head
from featpipe.splits import kfold

sys.path.insert(0, str(Path(__file__).parent))
from feature_sets import blocks_of, build  # noqa: E402


def by_accuracy(c: dict) -> tuple:
    return -c["acc"], c["loss"]


def by_log_loss(c: dict) -> tuple:
    return c["loss"], -c["acc"]


def staged(cands: list[dict], rank, flip: bool) -> dict:
    """Singles, then the best two side by side, then (flip) the winner flip-averaged: the first rule shipped."""
    by = {c["set"]: c for c in cands}
    singles = [c for c in cands if "+" not in c["set"] and feature_sets.FLIP not in c["set"]]
    a, b = sorted(singles, key=rank)[:2]
    pair = by.get(f"{a['set']}+{b['set']}") or by[f"{b['set']}+{a['set']}"]
    best = min([*singles, pair], key=rank)
    if flip:
        best = min([*singles, pair, by["+".join(p + feature_sets.FLIP for p in best["set"].split("+"))]], key=rank)
    return best


RULES = {
    "accuracy, staged, flip": lambda cs: staged(cs, by_accuracy, True),
    "accuracy, staged": lambda cs: staged(cs, by_accuracy, False),
    "log-loss, staged, flip": lambda cs: staged(cs, by_log_loss, True),
    "accuracy, all 20": lambda cs: min(cs, key=by_accuracy),
    "log-loss, all 20 (shipped)": lambda cs: min(cs, key=by_log_loss),
}


def table(blocks: dict, y, classes, groups, seeds) -> list[dict]:
    out = []
    for seed in seeds:
        cfg = HeadConfig(seed=seed)
        for fold, (tr, te) in enumerate(kfold(y, 5, seed, groups)):
            for parts in feature_sets.candidates(list(blocks)):
                X = feature_sets.matrix(blocks, parts)
                head = fit_head(X, y, len(classes), cfg, groups, tr)
                acc, loss = feature_sets.inner_scores(head)
                out.append({"seed": seed, "fold": fold, "set": feature_sets.name(parts), "acc": acc, "loss": loss,
                            "test": accuracy(head, X, y, te)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="photos,icons,digits")
    p.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/featpipe-feature-sets"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    res = {}
    for name in args.sets.split(","):
        data = build(name, args.workdir)
        if data is None:
            continue
        blocks, y, classes, groups, _ = blocks_of(data, args.workdir)
        rows = table(blocks, y, classes, groups, args.seeds)
        cell = lambda s, f: [r for r in rows if r["seed"] == s and r["fold"] == f]  # noqa: E731
        base = np.mean([r["test"] for r in rows if r["set"] == "mobilenet_v2"])
        res[name] = {rule: round(100 * (np.mean([pick(cell(s, f))["test"] for s in args.seeds for f in range(5)])
                                        - base), 2) for rule, pick in RULES.items()}
        print(name, res[name], file=sys.stderr)
    res["mean_gain_points"] = {rule: round(float(np.mean([res[n][rule] for n in res])), 2) for rule in RULES}
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
