"""The `featpipe` Typer app, the options its commands share, and how a command prints its result."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from featpipe.dataset import json_safe

app = typer.Typer(
    name="featpipe",
    help=("Prove on your own images that a pretrained backbone beats training from scratch — then ship the fast "
          "model."),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from featpipe import __version__

        typer.echo(f"featpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print featpipe's version and exit.")] = False) -> None:
    """Prove on your own images that a pretrained backbone beats training from scratch — then ship the fast model."""

DataDir = Annotated[Optional[Path], typer.Argument(
    help="ImageFolder tree DATA_DIR/<class>/<image>. Default: the shipped 196-photo, 5-class dataset.",
    show_default=False)]
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="Registry name (`featpipe backbones`) or any "
                                          "torchvision/timm model name.")]
FeatureBackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="Registry name (`featpipe backbones`), "
                                                 "any torchvision/timm model name, names joined by commas (their "
                                                 "embeddings side by side, each at unit length), or auto: every "
                                                 "offline backbone extracted, plain and flip-averaged; the single "
                                                 "one or pair with the lowest inner-CV log-loss of the head wins.")]
TtaOpt = Annotated[str, typer.Option("--tta", help="none | flip: each embedding averaged with its mirror image's "
                                     "(twice the forward passes; cached under its own key).")]
CacheDirOpt = Annotated[Path, typer.Option("--cache-dir", help="Where the HDF5 embedding caches live.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda (auto: cuda when available).")]
DecoderOpt = Annotated[str, typer.Option("--decoder", help="auto | dali | torchvision | pil (auto: nvJPEG on a GPU, "
                                           "through DALI, else torchvision; Pillow on CPU. Without a GPU, dali is "
                                           "DALI's CPU pipeline, torchvision libjpeg-turbo).")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="auto | fp32 | bf16 (auto: bf16 where the hardware "
                                           "has bf16 units: AMX/AVX512-BF16 CPUs, recent GPUs).")]
WeightsOpt = Annotated[Optional[Path], typer.Option("--weights", help="Local checkpoint (state dict) for the "
                                                    "backbone, instead of the packaged/hub weights.")]
EngineOpt = Annotated[str, typer.Option("--engine", help="local | ray (Ray Data: actors read, embed and write "
                                        "the cache; data and cache on a shared path; needs the ray extra).")]
RayAddressOpt = Annotated[Optional[str], typer.Option("--ray-address", help="--engine ray: join this Ray cluster "
                                                      "(e.g. HEAD:6379 or auto) instead of starting a local Ray.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="--engine ray: embedding actors (default: one "
                                                   "per GPU of the cluster, else one per CPU).")]
LabelsOpt = Annotated[Optional[Path], typer.Option("--labels", help="CSV or Parquet of the images and their "
                                                 "labels (columns path or filename, label, optional split: train, "
                                                 "val, test), instead of class folders; paths relative to "
                                                 "DATA_DIR, or absolute.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace a bundle at the output dir even if it was trained "
                                        "on another data dir.")]


NOTES: list[str] = []  # said on stderr after a command succeeds: an error stays the one line it is


def data_or_shipped(data_dir: Optional[Path]) -> Optional[Path]:
    """A missing DATA_DIR is easy to miss: say that the shipped photos stood in for it (all 196 take seconds)."""
    if data_dir is None:
        NOTES.append("featpipe: no DATA_DIR given: used the shipped demo set (196 photos, 5 classes); pass DATA_DIR "
                      "to use your own images")
    return data_dir


def classes_line(counts: dict[str, int]) -> str:
    return "classes: " + ", ".join(f"{c} {n}" for c, n in counts.items())


def emit(obj: dict, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(json_safe(obj)) + "\n")
    else:
        typer.echo(text)
