"""`featpipe` command line. Each command is a thin shell over a library function; errors are one line, exit 2.

The commands register on `app` when their modules are imported, in the order `featpipe --help` lists them."""

from __future__ import annotations

import os
import sys

import typer

try:  # recent typer vendors click as typer._click; older typer uses click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException

from featpipe.cli import embeddings  # noqa: F401  (each import registers its commands, in --help's order)
from featpipe.cli import models  # noqa: F401
from featpipe.cli import cache  # noqa: F401
from featpipe.cli.app import NOTES, app
from featpipe.dataset import as_text
from featpipe.errors import UserError


def main() -> None:
    """Entry point: usage errors and UserError become one line on stderr with exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(prog_name="featpipe", standalone_mode=False)
    except ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except UserError as e:
        _fail(str(e), 2)
    except OSError as e:  # a path the user gave that cannot be written (a folder, /proc, no permission)
        _fail(f"{as_text(str(e.filename))}: {e.strerror}" if e.filename and e.strerror else str(e), 2)
    except KeyboardInterrupt:
        _interrupted()
    if code == 130:  # typer turns Ctrl-C inside a command into a silent exit code 130
        _interrupted()
    for note in NOTES:
        print(note, file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"featpipe: error: {' '.join(message.split())}\n")
    sys.exit(code)


def _interrupted() -> None:
    """Ctrl-C: say so and leave at once. Interpreter shutdown would race the pipeline's daemon threads still inside
    torch (seen: 'terminate called without an active exception', SIGABRT). Nothing is lost by skipping it: the
    journal is flushed per batch and the kernel releases the cache lock, as after a kill."""
    resumable = len(sys.argv) > 1 and sys.argv[1] in ("finetune", "scratch")
    hint = " (the same command with --resume goes on after the last finished epoch)" if resumable else ""
    sys.stderr.write(f"featpipe: error: interrupted{hint}\n")
    sys.stderr.flush()
    os._exit(130)
