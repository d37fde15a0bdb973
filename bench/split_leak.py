"""What identical files do to val accuracy: the shipped set's first 30 photos per class, distinct and stored twice,
scored with a row-level split (featpipe before grouping copies) and with the grouped split featpipe makes now.

    python bench/split_leak.py [--workdir DIR]    (bench/README.md has the last run's table)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from featpipe.dataset import shipped_dataset
from featpipe.extract import ExtractConfig
from featpipe.features import load_features
from featpipe.heads import HeadConfig, accuracy, fit_head
from featpipe.splits import val_split


def build(work: Path) -> None:
    for cls in sorted(p for p in shipped_dataset().iterdir() if p.is_dir()):
        for f in sorted(cls.iterdir())[:30]:
            for name, copies in (("distinct", [f.name]), ("twice", [f.name, "copy-" + f.name])):
                (work / name / cls.name).mkdir(parents=True, exist_ok=True)
                for c in copies:
                    shutil.copy(f, work / name / cls.name / c)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/featpipe-split-leak"))
    work = ap.parse_args().workdir
    if not (work / "twice").exists():
        build(work)
    print("| data | seed | row-level split | grouped split |\n| --- | --- | --- | --- |")
    for name in ("distinct", "twice"):
        f = load_features(ExtractConfig(data_dir=work / name, cache_dir=work / "cache"), progress=False)
        for seed in (0, 1, 2):
            accs = []
            for groups in (None, f.groups):
                s = val_split(f.y, f.classes, 0.2, seed, groups=groups)
                head = fit_head(f.X[s.train], f.y[s.train], len(f.classes), HeadConfig(seed=seed),
                                None if groups is None else groups[s.train])
                accs.append(accuracy(head, f.X[s.val], f.y[s.val]))
            print(f"| {name} ({len(f.y)} files) | {seed} | {accs[0]:.3f} | {accs[1]:.3f} |")


if __name__ == "__main__":
    main()
