"""Long work as a person sees it: a rich progress bar and a summary line on stderr, stdout left for --json."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from rich.console import Console

    from featpipe.extract import ExtractConfig, ExtractResult
    from featpipe.evaluate import EvaluateConfig
    from featpipe.predict import PredictConfig


@contextmanager
def progress_bar(verb: str, name: str) -> Iterator[tuple["Console", Callable[[int, int], None]]]:
    """(stderr console, progress(done, total)); the bar shows on a terminal only (elsewhere rich's bar is a blank
    line) and vanishes when done."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    with Progress(TextColumn(f"{verb} {{task.fields[name]}}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True, disable=not console.is_interactive) as bar:
        task = bar.add_task(verb, total=None, name=name)
        yield console, lambda done, total: bar.update(task, completed=done, total=total)


def say(console: "Console", text: str) -> None:
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def run_extract(cfg: "ExtractConfig") -> "ExtractResult":
    """extract() with a progress bar on stderr and a summary line; shared by every command that needs features."""
    from featpipe.extract import extract as do_extract

    with progress_bar("extract", cfg.backbone) as (console, progress):
        res = do_extract(cfg, progress=progress)
    say(console, f"{res.backbone}: {res.images} images — computed {res.computed}, reused {res.reused}, "
                 f"skipped {len(res.skipped)} — {res.seconds:.2f} s ({res.images_per_sec:.1f} img/s, "
                 f"{res.decoder}, {res.device}, {res.precision}) -> cache {res.cache_file}")
    for s in res.skipped:
        say(console, f"  skipped {s['path']}: {s['reason']}")
    return res


def run_predict(cfg: "PredictConfig") -> dict:
    """predict() with a progress bar, a summary line and the skipped files, all on stderr."""
    from pathlib import Path

    from featpipe.predict import predict

    t0 = time.perf_counter()
    with progress_bar("predict", Path(cfg.model).name) as (console, progress):
        r = predict(cfg, progress=progress)
    n, m = r["predicted"], len(r["skipped"])
    say(console, f"predicted {n} image{'s' * (n != 1)}, skipped {m} in {time.perf_counter() - t0:.2f} s "
                 f"({r['model']})")
    for s in r["skipped"]:
        say(console, f"  skipped {s['path']}: {s['reason']}")
    return r


def run_evaluate(cfg: "EvaluateConfig") -> dict:
    """evaluate() with a progress bar, a summary line and the skipped files, all on stderr."""
    from pathlib import Path

    from featpipe.evaluate import evaluate

    t0 = time.perf_counter()
    with progress_bar("evaluate", Path(cfg.model).name) as (console, progress):
        r = evaluate(cfg, progress=progress)
    say(console, f"scored {r['images']} image{'s' * (r['images'] != 1)}, skipped {len(r['skipped'])} in "
                 f"{time.perf_counter() - t0:.2f} s ({r['model']})")
    for s in r["skipped"]:
        say(console, f"  skipped {s['path']}: {s['reason']}")
    return r
