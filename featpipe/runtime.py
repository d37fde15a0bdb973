"""One recipe for every process that runs a model (extract, Ray actors, train, predict, experiment): CPU threads
and allocator set, the device and its precision resolved; for extraction also the model and the decoder."""

from __future__ import annotations

import threading

from featpipe.pipeline import StageTimer


def prepare(device: str, precision: str = "auto"):
    """(torch.device, precision) for --device/--precision, after configuring the CPU side for this process."""
    from featpipe.embed import configure_cpu, resolve_device, resolve_precision

    configure_cpu()
    dev = resolve_device(device)
    return dev, resolve_precision(precision, dev)


def start_embedding(cfg, spec, timer: StageTimer, model_waiting: threading.Event | None = None):
    """(Embedder, decoder) for an ExtractConfig: the local compute stage and every Ray actor build theirs here.

    `model_waiting`, set while the model waits for decoded batches: with the model on the CPU, the decoder then
    works in the background and hurries only when the model waits (decode.PilDecoder)."""
    from featpipe.backbone import load
    from featpipe.decode import make_decoder
    from featpipe.embed import Embedder

    device, precision = prepare(cfg.device, cfg.precision)
    with timer("load_model"):
        embedder = Embedder(load(spec, cfg.weights).model, device, precision, flip=cfg.tta == "flip")
    cuda = (device.index or 0) if device.type == "cuda" else None
    decoder = make_decoder(cfg.decoder, spec.preprocessing, batch_size_for(cfg, device), cuda,
                           model_waiting if cuda is None else None)
    return embedder, decoder


def batch_size_for(cfg, device) -> int:
    from featpipe.embed import default_batch_size

    return cfg.batch_size or default_batch_size(device)


def embed_decoded(embedder, pixels, reasons: list[str | None], timer: StageTimer, wait: bool = True):
    """Embeddings of a decoded batch; None when every image failed to decode (the model never sees an empty batch).

    wait=False may return a handle that np.asarray() resolves (CUDA: the GPU keeps computing meanwhile)."""
    if None not in reasons:
        return None
    with timer("forward"):
        return embedder(pixels) if wait else embedder.submit(pixels)
