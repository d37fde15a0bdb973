"""How a backbone wants its pixels: resize the shorter side, centre-crop, normalise.

Decoders produce uint8 HWC crops; normalisation happens on the compute device (cheaper transfers, one code path).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocessing:
    resize: int  # shorter side after resizing
    crop: int  # square centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # "bilinear" | "bicubic"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Preprocessing":
        d = json.loads(text)
        return cls(d["resize"], d["crop"], tuple(d["mean"]), tuple(d["std"]), d["interpolation"])

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_crop_pct(cls, crop: int, crop_pct: float, mean, std, interpolation: str) -> "Preprocessing":
        """timm's convention: resize the shorter side to crop / crop_pct, then crop."""
        return cls(int(crop / crop_pct), crop, tuple(mean), tuple(std), interpolation)
