"""Run a frozen backbone fast: channels_last, inference_mode, bf16 autocast where the hardware has bf16 units."""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from featpipe.backbone import Backbone
from featpipe.errors import UserError
from featpipe.hardware import cpu_has_bf16

# bf16: the first convolutions (full resolution, linear bottleneck) keep fp32: all-bf16 put one shipped photo's
# embedding under the 0.99 cosine spec (bench/README.md, "bf16 autocast stays the default").
FP32_LEADING_CONVS = 3
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt() parameters (malloc.h)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but no CUDA GPU is available")
    dev = torch.device(device)
    # an index always, so reports name the card that ran ("cuda:0") and the decoder is placed on the same one
    return torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def default_batch_size(device: torch.device) -> int:
    """CPU: 16, measured fastest of 16/32/64 for mobilenet_v2 and efficientnet_lite0 (activations stay in cache;
    bench/README.md). CUDA: 256, enough work per launch to keep a large GPU busy at these small input sizes."""
    return 256 if device.type == "cuda" else 16


def configure_cpu() -> None:
    """One intra-op thread per core we may use (not per core the machine has: containers lie), and an allocator
    that keeps freed memory for the next batch."""
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    reuse_freed_memory()


def reuse_freed_memory() -> None:
    """glibc malloc: serve large blocks from the heap (no mmap) and keep up to 1 GiB freed at its top.

    By default glibc maps each block over its adaptive threshold afresh and trims the heap top, so every batch's
    activations (tens of MB) arrive as new zero-filled pages, and the CPU forward spends much of its time in the
    kernel's page-fault path (bench/README.md). What tcmalloc/jemalloc fix by LD_PRELOAD, done in-process. Other C
    libraries (musl, macOS): nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


@dataclass
class Embedder:
    model: Backbone
    device: torch.device
    precision: str
    flip: bool = False  # test-time augmentation: the embedding of each image and of its mirror image, averaged

    def __post_init__(self) -> None:
        self.model = self.model.to(self.device).eval().to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        if self.precision == "bf16":
            convs = [m for m in self.model.modules() if isinstance(m, torch.nn.Conv2d)]
            keep_fp32(convs[:FP32_LEADING_CONVS], self.device.type)

    def __call__(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 (N, H, W, 3) on any device -> float32 (N, dim) numpy embeddings."""
        return np.asarray(self.submit(batch))

    @torch.inference_mode()
    def submit(self, batch: np.ndarray | torch.Tensor) -> "np.ndarray | Pending":
        """Like __call__, but on CUDA returns at once: the caller queues the next batch while this one computes.

        Host batches go up from pinned memory and embeddings come back into pinned memory, both asynchronously;
        `np.asarray(result)` is the only synchronisation (extract's writer thread does it, off the compute thread).
        """
        x = torch.as_tensor(batch)
        if self.device.type == "cuda" and x.device.type == "cpu":
            x = x.pin_memory()
        x = x.to(self.device, non_blocking=True) if x.device != self.device else x
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.model(x).float()
            if self.flip:  # x is NHWC: dim 2 is the width
                out = (out + self.model(x.flip(2)).float()) / 2
        if self.device.type != "cuda":
            return out.numpy()
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Pending(host, done)


def keep_fp32(modules: list[torch.nn.Module], device_type: str) -> None:
    """Run these modules in fp32 inside an enclosing bf16 autocast (hooks: the state dict stays unchanged)."""
    local = threading.local()  # autocast state is per thread, and so is each call's stack of contexts

    def enter(module, args):
        ctx = torch.autocast(device_type, enabled=False)
        ctx.__enter__()
        local.__dict__.setdefault("active", []).append(ctx)
        return tuple(a.float() for a in args)

    def leave(module, args, out):
        local.active.pop().__exit__(None, None, None)

    for m in modules:
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave, always_call=True)


@dataclass
class Pending:
    """Embeddings still being copied from the GPU; numpy conversion waits for the copy."""

    host: torch.Tensor
    done: "torch.cuda.Event"

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        self.done.synchronize()
        return self.host.numpy() if dtype is None else self.host.numpy().astype(dtype)
