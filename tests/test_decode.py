"""Decoding fast without changing the pixels: torch's resize against torchvision's, draft() against a full decode,
and background decoding that yields the CPU to the model but never starves."""

from __future__ import annotations

import gc
import io
import os
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import transforms

from featpipe.decode import DRAFT_MARGIN, PilDecoder, TorchvisionDecoder, pil_decode, probe, resize_crop
from featpipe.decode.pixels import rgb_pixels
from featpipe.preprocess import Preprocessing
from featpipe.registry import resolve

PRE = resolve("mobilenet_v2").preprocessing
MODES = {"bilinear": transforms.InterpolationMode.BILINEAR, "bicubic": transforms.InterpolationMode.BICUBIC}


@pytest.fixture(scope="module")
def photo(shipped) -> Image.Image:
    """A real photo, upscaled so that every test size below is a downscale or an upscale of real detail."""
    src = ImageOps.exif_transpose(Image.open(sorted(shipped.glob("*/*.jpg"))[3])).convert("RGB")
    return src.resize((2000, 1500), Image.Resampling.BICUBIC)


def reference(im: Image.Image, pre: Preprocessing) -> np.ndarray:
    """What torchvision's own transforms give on the Pillow image (the naive pipeline featpipe must match)."""
    tf = transforms.Compose([transforms.Resize(pre.resize, MODES[pre.interpolation]), transforms.CenterCrop(pre.crop)])
    return np.asarray(tf(im))


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "efficientnet_lite0"])  # bilinear 256/224, bicubic 256/224
# (3000, 2000): Pillow keeps it in several memory blocks, so rgb_pixels copies; (4000, 250): Pillow's box resize
@pytest.mark.parametrize("size", [(37, 23), (300, 200), (640, 480), (481, 1023), (2000, 1500), (3000, 2000),
                                  (4000, 250)])
def test_resize_crop_gives_torchvisions_pixels(photo, backbone, size):
    pre = resolve(backbone).preprocessing
    im = photo.resize(size, Image.Resampling.BICUBIC)
    out, want = resize_crop(im, pre), reference(im, pre)
    assert out.shape == want.shape == (pre.crop, pre.crop, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - want).max() <= 1


def test_rgb_pixels_are_pillows_own_memory_and_outlive_the_image(photo):
    im = photo.resize((640, 480))
    first, again = rgb_pixels(im), rgb_pixels(im)
    assert first.shape == (480, 640, 4) and not first.flags.writeable
    assert first.__array_interface__["data"][0] == again.__array_interface__["data"][0]  # no copy: the same memory
    want = np.asarray(im).copy()
    assert np.array_equal(first[..., :3], want)
    del im, again
    gc.collect()
    assert np.array_equal(first[..., :3], want)  # still Pillow's memory, held by the export


def test_rgb_pixels_with_padded_rows_still_gives_the_pixels():
    """PILLOW_ALIGNMENT pads each row; the view must never read the padding as pixels (Pillow 11.2-12 exported
    padded rows as packed: pixels.EXPORTS_PACKED_ROWS)."""
    code = ("import numpy as np; from PIL import Image; from featpipe.decode.pixels import rgb_pixels\n"
            "for w, h in [(640, 480), (333, 251), (17, 9), (1, 5), (16, 9)]:\n"
            "    im = Image.effect_noise((w, h), 60).convert('RGB')\n"
            "    assert np.array_equal(rgb_pixels(im)[..., :3], np.asarray(im)), (w, h)\n")
    for alignment in ("16", "64"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, "PILLOW_ALIGNMENT": alignment})
        assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("im", [Image.new("RGB", (3000, 2000), (1, 2, 3)), Image.new("L", (30, 20), 7),
                                Image.new("RGBA", (30, 20), (1, 2, 3, 4))], ids=["several-blocks", "L", "RGBA"])
def test_rgb_pixels_copies_what_pillow_cannot_export_whole(im):
    assert np.array_equal(rgb_pixels(im), np.asarray(im))  # (H, W, 3) or (H, W): np.asarray's own copy


@pytest.mark.parametrize("size", [(1024, 768), (1600, 1200), (1200, 1600), (3000, 2000)])
def test_draft_decoding_stays_close_to_a_full_decode(photo, size):
    """draft() shrinks big JPEGs in the IDCT, keeping DRAFT_MARGIN x the target: the crop stays within ~1 level."""
    pre = PRE
    buf = io.BytesIO()
    photo.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (round(DRAFT_MARGIN * pre.resize),) * 2)
    assert drafted.size[0] < size[0], "this size should decode at reduced scale"
    diff = np.abs(pil_decode(data, pre).astype(int) - reference(Image.open(io.BytesIO(data)).convert("RGB"), pre))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread SCHED_IDLE is Linux's")


@linux_only
def test_background_pool_runs_at_idle_priority_the_rest_keeps_its_own():
    dec = PilDecoder(PRE, 2, model_waiting=threading.Event())
    assert dec.background.submit(os.sched_getscheduler, 0).result() == os.SCHED_IDLE
    assert dec.pool.submit(os.sched_getscheduler, 0).result() == os.SCHED_OTHER
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the calling thread is untouched


@pytest.fixture(scope="module")
def jpegs(shipped) -> list[bytes]:
    return [p.read_bytes() for p in sorted(shipped.glob("*/*.jpg"))[:6]]


def decode_in_thread(dec: PilDecoder, data: list[bytes]) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(result=dec.decode(data, [probe(d) for d in data])), daemon=True)
    t.start()
    return t, out


def assert_same_as_plain_decode(result: tuple, jpegs: list[bytes]) -> None:
    pixels, reasons = result
    want, _ = PilDecoder(PRE, 1).decode(jpegs, [probe(d) for d in jpegs])
    assert reasons == [None] * len(jpegs) and np.array_equal(pixels, want)


def test_a_waiting_model_takes_queued_images_from_a_starved_background_pool(jpegs):
    """Background threads held by other work (as by programs busy on every core): the batch waits while the model
    computes, and finishes on the normal pool once the model waits for it."""
    waiting, release = threading.Event(), threading.Event()
    dec = PilDecoder(PRE, 2, model_waiting=waiting)
    held = [dec.background.submit(release.wait) for _ in range(2)]
    t, out = decode_in_thread(dec, jpegs)
    t.join(0.5)
    assert t.is_alive(), "the batch should wait for the background pool while the model is busy"
    waiting.set()
    t.join(30)
    release.set()
    assert not t.is_alive() and all(h.result() for h in held)
    assert_same_as_plain_decode(out["result"], jpegs)


class StallsInBackground(PilDecoder):
    """Decodes normally, except that a background thread's decode hangs until released: a starved worker."""

    release = threading.Event()

    def decode_one(self, data: bytes):
        if os.sched_getscheduler(0) == os.SCHED_IDLE:
            self.release.wait()
        return super().decode_one(data)


@linux_only
def test_a_waiting_model_redoes_images_a_stalled_background_thread_holds(jpegs):
    waiting = threading.Event()
    dec = StallsInBackground(PRE, 2, model_waiting=waiting)
    waiting.set()
    t, out = decode_in_thread(dec, jpegs)
    t.join(30)
    dec.release.set()
    assert not t.is_alive()
    assert_same_as_plain_decode(out["result"], jpegs)


def jpeg_of(im: Image.Image, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def batchable(photo) -> list[bytes]:
    """JPEGs a batched decoder takes: three sizes (one drafted by Pillow), gray, and every EXIF orientation."""
    sizes = [(640, 480), (481, 1023), (2000, 1500), (300, 200)]
    asym = photo.crop((0, 0, 1200, 800)).resize((420, 280))  # no symmetry a wrong flip could hide behind
    return [jpeg_of(photo.resize(s)) for s in sizes] + [jpeg_of(photo.resize((640, 480)).convert("L"))] + \
        [jpeg_of(asym, o) for o in range(1, 9)]


def per_image_mean_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(int) - b).reshape(len(a), -1).mean(1)


def test_torchvision_decoder_gives_pillows_crops(batchable):
    """The CPU twin of the nvJPEG path: same code (orientation, grouped resize, crop) on libjpeg-turbo."""
    probes = [probe(d) for d in batchable]
    assert all(p.batch_ok for p in probes) and [p.orientation for p in probes[-8:]] == list(range(1, 9))
    ours = TorchvisionDecoder(PRE, None)._run(batchable, probes)
    want, _ = PilDecoder(PRE).decode(batchable, probes)
    assert ours is not None and ours.shape == want.shape == (13, PRE.crop, PRE.crop, 3) and ours.dtype == np.uint8
    assert per_image_mean_diff(ours, want).max() < 1.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_gpu_torchvision_decoder_matches_its_cpu_twin(batchable):
    """nvJPEG + resize on the GPU against the same code on libjpeg-turbo: a failure here is the decoder's, not the
    model's (test_extract's GPU test compares whole embeddings)."""
    probes = [probe(d) for d in batchable]
    gpu = TorchvisionDecoder(PRE, 0)._run(batchable, probes)
    assert gpu is not None and gpu.is_cuda and gpu.shape == (13, PRE.crop, PRE.crop, 3)
    assert per_image_mean_diff(gpu.cpu().numpy(), TorchvisionDecoder(PRE, None)._run(batchable, probes)).max() < 3


@pytest.mark.parametrize("device", [None, pytest.param(0, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)"))], ids=["cpu", "gpu"])
def test_torchvision_decoder_chunks_by_pixels_and_keeps_input_order(batchable, monkeypatch, device):
    from featpipe.decode import nvjpeg
    from featpipe.decode.batched import pixel_chunks

    probes = [probe(d) for d in batchable]
    whole = TorchvisionDecoder(PRE, device)._run(batchable, probes)
    assert pixel_chunks([(10, 10), (10, 10), (30, 30), (5, 5)], 250) == [[0, 1], [2], [3]]
    monkeypatch.setattr(nvjpeg, "CHUNK_PIXELS", 640 * 480 + 1)  # about one image per nvJPEG call
    chunked = TorchvisionDecoder(PRE, device)._run(batchable, probes)
    if device is not None:
        whole, chunked = whole.cpu().numpy(), chunked.cpu().numpy()
    np.testing.assert_array_equal(chunked, whole)


def test_torchvision_decoder_sends_what_it_cannot_take_to_pillow(batchable, photo):
    """PNG and CMYK skip the batch (probe); a corrupt JPEG the probe passes fails the nvJPEG call, and only that
    file goes to Pillow: the others are retried one by one."""
    good = batchable[0]
    corrupt = good[:2000] + bytes(range(256)) * 20 + good[2000 + 5120:]
    png = io.BytesIO()
    photo.resize((300, 200)).save(png, "PNG")
    cmyk = io.BytesIO()
    photo.resize((300, 200)).convert("CMYK").save(cmyk, "JPEG")
    items = [good, png.getvalue(), cmyk.getvalue(), batchable[1], corrupt]
    probes = [probe(d) for d in items]
    assert [p.batch_ok for p in probes] == [True, False, False, True, True]
    tv = TorchvisionDecoder(PRE, None)
    alone = tv._run([good, corrupt], [probes[0], probes[4]])
    assert isinstance(alone, list) and alone[1] is None
    np.testing.assert_array_equal(alone[0], tv._run([good], [probes[0]])[0])
    pixels, reasons = tv.decode(items, probes)
    want = [PilDecoder(PRE).decode_one(d) for d in items]
    assert reasons == [w if isinstance(w, str) else None for w in want]
    rows = np.stack([w for w in want if not isinstance(w, str)])
    assert pixels.shape == rows.shape and per_image_mean_diff(pixels, rows).max() < 1.5


def test_decoder_choice(monkeypatch):
    """auto: Pillow without CUDA; on a CUDA device nobody has, every GPU decoder fails to build and auto falls back
    to Pillow, while a forced one says why in one line."""
    from featpipe.decode import make_decoder
    from featpipe.errors import UserError

    assert make_decoder("auto", PRE, 16, None).name == "pil"
    assert make_decoder("torchvision", PRE, 16, None).name == "torchvision-cpu"
    assert make_decoder("dali", PRE, 16, None).name == "dali-cpu"
    missing = torch.cuda.device_count()  # a device index past the last GPU (0 here: no GPU at all)
    assert make_decoder("auto", PRE, 16, missing).name == "pil"
    for kind in ("dali", "torchvision"):
        with pytest.raises(UserError, match=f"^{kind} decoder unavailable: "):
            make_decoder(kind, PRE, 16, missing)


def raw_exif(*entries: tuple[int, int, int, bytes]) -> bytes:
    """An EXIF block written by hand (little-endian TIFF, one IFD): tags of any type, values inline or after it."""
    data_at, ifd, tail = 8 + 2 + 12 * len(entries) + 4, b"", b""
    for tag, kind, count, value in sorted(entries):
        inline = len(value) <= 4
        ifd += struct.pack("<HHI", tag, kind, count) + (value.ljust(4, b"\0") if inline else
                                                         struct.pack("<I", data_at + len(tail)))
        tail += b"" if inline else value
    return b"Exif\0\0II*\0" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0) + tail


@pytest.mark.parametrize("tag, upright", [
    ((3, 1, struct.pack("<H", 6)), False),  # SHORT 6: rotate
    ((5, 1, struct.pack("<II", 6, 1)), False),  # RATIONAL 6/1 equals 6: rotate
    ((2, 2, b"6\0"), True),  # ASCII "6": no orientation (exif_transpose's dict lookup), int("6") would rotate
    ((11, 1, struct.pack("<f", 6.5)), True),  # FLOAT 6.5: int() would truncate it to 6
])
def test_orientation_tags_of_any_type_read_as_pillow_reads_them(photo, tag, upright):
    im = photo.crop((0, 0, 1200, 800)).resize((420, 280))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, exif=raw_exif((0x0112, *tag)))
    data = buf.getvalue()
    want = pil_decode(jpeg_of(im, 1 if upright else 6), PRE)
    ours, _ = TorchvisionDecoder(PRE, None).decode([data], [probe(data)])
    assert per_image_mean_diff(np.stack([pil_decode(data, PRE), ours[0]]), np.stack([want, want])).max() < 1.5


def test_an_exif_block_pillow_cannot_rewrite_still_decodes_upright(photo):
    """ImageOps.exif_transpose re-encodes the EXIF it keeps and raised on a DOUBLE-typed Software tag: the file was
    skipped by Pillow while nvJPEG's path embedded it."""
    im = photo.crop((0, 0, 1200, 800)).resize((420, 280))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=92, exif=raw_exif((0x0112, 3, 1, struct.pack("<H", 6)),
                                                   (0x0131, 12, 1, struct.pack("<d", 1.5))))
    out = PilDecoder(PRE).decode_one(buf.getvalue())
    assert not isinstance(out, str), out
    assert per_image_mean_diff(out[None], pil_decode(jpeg_of(im, 6), PRE)[None]).max() < 1.5


def test_a_small_jpeg_without_its_end_marker_is_not_batched(photo):
    """rfind's -1 passed the "end marker in the last KiB" test for any file under 1 KiB."""
    data = jpeg_of(photo.resize((16, 16)))
    assert len(data) < 1024 and probe(data).batch_ok
    assert not probe(data[:-2]).batch_ok and not probe(data[: len(data) // 2]).batch_ok


def test_decode_files_keeps_input_order_and_turns_every_failure_into_a_reason(tmp_path, jpegs):
    """train and predict both decode through it: a sha256 for identical bytes, an image or the skip reason."""
    from featpipe.decode import decode_files

    files = {"a.jpg": jpegs[0], "empty.jpg": b"", "text.jpg": b"not an image", "cut.jpg": jpegs[1][:len(jpegs[1]) // 2],
             "b.jpg": jpegs[1], "same-as-a.jpg": jpegs[0]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.jpg").mkdir()
    paths = [str(tmp_path / n) for n in files] + [tmp_path / "folder.jpg", tmp_path / "missing.jpg"]
    out = decode_files(paths, PilDecoder(PRE, 2))
    shas = [s for s, _ in out]
    assert shas[0] == shas[5] != shas[4] and all(len(s) == 64 for s in shas[:6]) and shas[6:] == ["", ""]
    reasons = [r if isinstance(r, str) else None for _, r in out]
    assert reasons[:3] == [None, "empty file", "not an image"] and reasons[3].startswith("decode failed: ")
    assert reasons[4:6] == [None, None] and reasons[6] == "not a regular file" and reasons[7].startswith("unreadable:")
    for i, data in [(0, jpegs[0]), (4, jpegs[1])]:
        np.testing.assert_array_equal(out[i][1], pil_decode(data, PRE))


def test_importing_the_decoders_loads_neither_torch_nor_dali():
    """torch and DALI are imported only inside the decoders that use them (the package docstring says so)."""
    code = "import sys, featpipe.decode; print(sorted({'torch', 'torchvision', 'nvidia.dali'} & sys.modules.keys()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:] or proc.stdout
