"""Extraction as a person sees it: a rich progress bar and a summary line on stderr, stdout left for --json."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featpipe.extract import ExtractConfig, ExtractResult


def run_extract(cfg: "ExtractConfig") -> "ExtractResult":
    """extract() with a progress bar on stderr and a summary line; shared by every command that needs features."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from featpipe.extract import extract as do_extract

    console = Console(stderr=True)
    with Progress(TextColumn("extract {task.fields[name]}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("extract", total=None, name=cfg.backbone)
        res = do_extract(cfg, progress=lambda done, total: bar.update(task, completed=done, total=total))
    console.print(f"{res.backbone}: {res.images} images — computed {res.computed}, reused {res.reused}, "
                  f"skipped {len(res.skipped)} — {res.seconds:.2f} s ({res.images_per_sec:.1f} img/s, "
                  f"{res.decoder}, {res.device}, {res.precision}) -> cache {res.cache_file}", highlight=False,
                  soft_wrap=True)
    for s in res.skipped:
        console.print(f"  skipped {s['path']}: {s['reason']}", highlight=False, markup=False, soft_wrap=True)
    return res
