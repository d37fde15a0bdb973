"""Copy the demo's generated report into docs/ and splice its table into README.md (run by `make docs`).

The README's demo numbers are never typed by hand: they come from the last `featpipe demo` run in reports/demo.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- demo-report:start -->", "<!-- demo-report:end -->"


def main(report_dir: Path = ROOT / "reports" / "demo") -> None:
    for src, dst in (("report.md", "demo-report.md"), ("report.png", "demo-report.png"),
                     ("confusion.png", "demo-confusion.png")):
        shutil.copyfile(report_dir / src, ROOT / "docs" / dst)
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    lines = (report_dir / "report.md").read_text().strip().splitlines()
    body = "\n".join(lines[1:] if lines[0].startswith("# ") else lines).strip()
    # report.md links the models it saved beside it (reports/ is not committed): in the README, names only
    body = re.sub(r"\[([^\]]+)\]\(models/[^)]*\)", r"`\1`", body)
    (ROOT / "README.md").write_text(f"{head}{START}\n{body}\n{END}{tail}")


if __name__ == "__main__":
    main(*(Path(a) for a in sys.argv[1:]))
