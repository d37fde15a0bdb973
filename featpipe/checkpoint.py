"""A training run's state after each finished epoch, in its bundle dir, so `--resume` continues a killed run from
there: the model, the optimiser, the best epoch's weights, the history and torch's random state (the resumed
epochs draw the same batches and crops the uninterrupted run would have). Removed once the bundle is written."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from featpipe.errors import UserError, first_line

NAME = "checkpoint.pt"


class Checkpoint:
    """`fingerprint`: what must not change between the killed run and its resumption (data, classes, method,
    hyperparameters); --epochs may grow."""

    def __init__(self, out: Path, fingerprint: dict, resume: bool):
        self.path, self.fingerprint, self.resume = Path(out) / NAME, fingerprint, resume

    def load(self) -> dict | None:
        """The saved state when resuming, else None (a stale checkpoint is said and later replaced)."""
        if not self.path.exists():
            if self.resume:
                print(f"featpipe: no checkpoint in {self.path.parent}: starting at epoch 1", file=sys.stderr)
            return None
        if not self.resume:
            print(f"featpipe: replacing the checkpoint of an interrupted run in {self.path.parent} (--resume "
                  f"continues one)", file=sys.stderr)
            return None
        try:  # weights_only: a checkpoint.pt found in an output dir must not run code when read
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a torn or foreign file: say which, never train on it
            raise UserError(f"cannot read checkpoint {self.path}: {type(e).__name__}; delete it to start over") \
                from None
        if not isinstance(state, dict) or not isinstance(state.get("fingerprint"), dict) or "epoch" not in state:
            raise UserError(f"{self.path} is not a featpipe training checkpoint; delete it or pass another --out")
        changed = sorted(k for k in self.fingerprint.keys() | state["fingerprint"].keys()
                         if self.fingerprint.get(k) != state["fingerprint"].get(k))
        if changed:
            raise UserError(f"checkpoint {self.path} is from a different run ({', '.join(changed)} changed): rerun "
                            f"without --resume to start over")
        return state

    def save(self, state: dict) -> None:
        """Atomically: a kill while writing leaves the previous epoch's checkpoint."""
        tmp = self.path.with_name(NAME + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"fingerprint": self.fingerprint, **state}, tmp)
            os.replace(tmp, self.path)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            raise UserError(f"cannot write checkpoint {self.path}: {getattr(e, 'strerror', None) or first_line(e)}") \
                from None

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
