"""featpipe throughput, measured in one run: decode, forward ceiling, extract end to end, a naive baseline, cache.

    python bench/throughput.py [--backbone mobilenet_v2] [--images 1000] [--repeats 3] [--json OUT.json] [--small]

Repeats are interleaved (every measurement once, then again) so that load from other processes on a shared machine
hits each measurement alike; medians are reported. Every featpipe figure runs featpipe's own code (decoders,
Embedder, extract, heads, train); only the naive baseline is written here, on purpose, the way a user would.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import featpipe  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import numpy as np
import torch
from PIL import Image, ImageOps

from featpipe import registry
from featpipe.backbone import load
from featpipe.dataset import scan, shipped_dataset
from featpipe.decode import PilDecoder, make_decoder, probe
from featpipe.embed import Embedder, configure_cpu, default_batch_size, resolve_device, resolve_precision
from featpipe.errors import UserError
from featpipe.extract import ExtractConfig, extract
from featpipe.features import load_features

SIZES = [(640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200)]  # camera-like, 0.3 to 1.9 MP
REPO = Path(__file__).resolve().parents[1]


def build_images(dst: Path, n: int, sizes: list[tuple[int, int]] = SIZES) -> Path:
    """The shipped photos re-encoded (JPEG q90) at `sizes` (camera sizes): decode cost like real data, labels kept."""
    marker = dst / f".complete-{n}"
    if marker.exists():
        return dst
    _root, shipped, _classes = scan(shipped_dataset())
    by_class: dict[str, list] = {}
    for f in shipped:
        by_class.setdefault(f.label, []).append(f)
    files = [f for group in itertools.zip_longest(*by_class.values()) for f in group if f]  # classes interleaved

    def make(i: int) -> None:
        f = files[i % len(files)]
        w, h = sizes[i % len(sizes)]
        im = ImageOps.exif_transpose(Image.open(f.path)).convert("RGB")
        if im.height > im.width:
            w, h = h, w
        (dst / f.label).mkdir(parents=True, exist_ok=True)
        im.resize((w, h), Image.Resampling.BICUBIC).save(dst / f.label / f"{i:05d}.jpg", quality=90)

    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:  # Pillow releases the GIL: one per core
        list(pool.map(make, range(n)))
    marker.touch()
    return dst


def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def batches(seq, bs: int):
    return [seq[i:i + bs] for i in range(0, len(seq), bs)]


def make_decoders(pre, bs: int, device: torch.device) -> dict:
    """Every decoder this machine has, built by featpipe's own make_decoder (torchvision on the CPU only without
    CUDA: there it is just the nvJPEG path's test twin)."""
    decoders = {"pil": PilDecoder(pre)}
    gpu = [0] if device.type == "cuda" else []
    for kind, devs in (("dali", [None] + gpu), ("torchvision", gpu or [None])):
        for dev in devs:
            try:
                decoder = make_decoder(kind, pre, bs, dev)
                decoders[decoder.name] = decoder
            except UserError as e:  # no DALI wheel / no nvJPEG in this build: report, carry on
                print(f"{e} ({'CPU' if dev is None else 'GPU'})", file=sys.stderr)
    return decoders


def decode_all(decoder, data: list[bytes], probes: list, bs: int) -> None:
    for d, p in zip(batches(data, bs), batches(probes, bs)):
        out, _ = decoder.decode(d, p)
    if isinstance(out, torch.Tensor) and out.is_cuda:
        torch.cuda.synchronize()


def forward_all(embedder: Embedder, pixels: torch.Tensor, bs: int) -> None:
    """All batches queued, then their embeddings awaited, as extract does (on CUDA: no host sync between batches)."""
    for out in [embedder.submit(x) for x in batches(pixels, bs)]:
        np.asarray(out)


def forward_replicas(embedder: Embedder, pixels: torch.Tensor, bs: int, pool: ThreadPoolExecutor) -> list:
    """The same model on one thread per core, each running whole batches with torch's ops single-threaded: no
    barrier after every op, so the most these cores do for the model alone. extract does not run it this way
    (it was slower there: decoding then finds no idle moment; bench/README.md)."""
    return list(pool.map(embedder, batches(pixels, bs)))


def single_threaded() -> None:
    """Thread initializer: torch fixes a thread's op thread count at its first use; make that now, then set it to 1."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def run_extract(images: Path, cache: Path, args, decoder: str) -> dict:
    cfg = ExtractConfig(data_dir=images, backbone=args.backbone, cache_dir=cache, device=args.device, decoder=decoder,
                        precision=args.precision, batch_size=args.batch_size)
    res = extract(cfg)
    assert res.computed + res.reused == res.images, res.skipped
    return {"seconds": res.seconds, "decoder": res.decoder, "stages": res.stage_seconds, "cfg": cfg}


def naive(images: Path, spec, bs: int, work: Path) -> tuple[float, dict[str, np.ndarray]]:
    """The naive baseline, run as a user runs their script: in a fresh Python, without this process's tuning
    (featpipe.embed.configure_cpu: thread count, malloc settings). Returns its seconds and embeddings by path."""
    out = work / "naive.npz"
    code = f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import throughput; throughput.naive_script()"
    subprocess.run([sys.executable, "-c", code, str(images), spec.name, str(bs), str(out)], check=True)
    with np.load(out) as z:
        return float(z["seconds"]), dict(zip(z["paths"].tolist(), z["embeddings"]))


def naive_script() -> None:
    """The usual first attempt: ImageFolder + DataLoader(2 workers) + torchvision transforms, fp32, NCHW.

    Same weights and preprocessing as featpipe; timed from model load to the last embedding, like a cold extract."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    images, backbone, bs, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    spec = registry.resolve(backbone)
    pre = spec.preprocessing
    t0 = time.perf_counter()
    model = load(spec).model.body.eval()
    interp = transforms.InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else \
        transforms.InterpolationMode.BILINEAR
    tf = transforms.Compose([transforms.Resize(pre.resize, interpolation=interp), transforms.CenterCrop(pre.crop),
                             transforms.ToTensor(), transforms.Normalize(pre.mean, pre.std)])
    ds = datasets.ImageFolder(images, tf)
    emb = []
    with torch.no_grad():
        for x, _ in DataLoader(ds, batch_size=bs, num_workers=2):
            emb.append(model(x).flatten(1).numpy())
    seconds = time.perf_counter() - t0
    np.savez(out, seconds=seconds, paths=np.array([p for p, _ in ds.samples]), embeddings=np.concatenate(emb))


def cosines(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    keys = sorted(a)
    x, y = np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys])
    c = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    return {"min": round(float(c.min()), 5), "median": round(float(np.median(c)), 5), "n": len(keys)}


def cached_embeddings(cfg: ExtractConfig) -> dict[str, np.ndarray]:
    f = load_features(cfg, progress=False)
    return dict(zip(f.paths, f.X))


def head_fit_seconds(cfg: ExtractConfig) -> float:
    from featpipe.heads import HeadConfig, fit_head

    f = load_features(cfg, progress=False)
    seconds, _ = timed(fit_head, f.X, f.y, len(f.classes), HeadConfig())
    return seconds


def finetune_epoch_seconds(cfg: ExtractConfig, out: Path) -> float:
    """One epoch of featpipe's own fine-tune (last 3 blocks + head, augmentation, val pass), its batches decoded as
    it trains (since 2026-12-04; before, the images were decoded once up front and not counted)."""
    from featpipe.train import TrainConfig, finetune, training_data

    tc = TrainConfig(data_dir=cfg.data_dir, backbone=cfg.backbone, cache_dir=cfg.cache_dir, device=cfg.device,
                     epochs=1, out=out)
    res = finetune(tc, training_data(tc), log=lambda s: None)
    return float(res.history[1]["seconds"])


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", "featpipe", "bench")
    info = {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "cores_machine": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(),
            "commit": commit + ("+dirty" if dirty else ""),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None}
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError:
        info["dali"] = None
    return info


def git(*args: str) -> str:
    """A git query about this checkout; "" where there is no git or no repository (a copied tree on a GPU box)."""
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 2)


def bench(args) -> dict:
    configure_cpu()
    info = machine()
    spec = registry.resolve(args.backbone)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    bs = args.batch_size or default_batch_size(device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="featpipe-bench-"))
    images = build_images(work / f"images-{args.images}", args.images)
    _root, files, _ = scan(images)
    data = [Path(f.path).read_bytes() for f in files]
    probes = [probe(d) for d in data]
    n = len(data)

    decoders = make_decoders(spec.preprocessing, bs, device)
    pixels = torch.from_numpy(decoders["pil"].decode(data, probes)[0])
    if device.type == "cuda":
        pixels = pixels.to(device)
    embedder = Embedder(load(spec).model, device, precision)
    sweep = [int(b) for b in args.sweep.split(",")] if args.sweep else []
    # warm-up: first-call allocations and kernel selection; on CUDA each batch shape (the tail's too) selects its own
    # kernels (1.6 s on the H200 for bs 256's tail), so every timed shape is run once first
    for b in [bs, *sweep] if device.type == "cuda" else [bs]:
        forward_all(embedder, pixels if device.type == "cuda" else pixels[:bs], b)
    # extract's decoder kinds on this device: pil, then dali, torchvision where they built for it
    extract_decoders = list(dict.fromkeys(k.split("-")[0] for k in decoders
                                          if k == "pil" or k.endswith("-gpu" if device.type == "cuda" else "-cpu")))
    # what --decoder auto picks here, asked of featpipe: the headline figures use it
    cuda = (device.index or 0) if device.type == "cuda" else None
    auto = make_decoder("auto", spec.preprocessing, bs, cuda).name.split("-")[0]

    replicas = ThreadPoolExecutor(info["cores_usable"], initializer=single_threaded) if device.type == "cpu" else None
    if replicas is not None:
        warm = pixels[:info["cores_usable"] * bs]  # a batch per thread: each starts (and goes single-threaded) now
        same = np.concatenate(forward_replicas(embedder, warm, bs, replicas))
        assert np.allclose(same, embedder(warm), atol=1e-4), "replicas disagree"
        configure_cpu()  # the replicas' threads set torch's process-wide count to 1: back to one per core
    t: dict[str, list[float]] = {}
    cfgs: dict[str, ExtractConfig] = {}
    stages: dict[str, dict] = {}
    names: dict[str, str] = {}
    for r in range(args.repeats):
        for name, dec in decoders.items():
            t.setdefault(f"decode:{name}", []).append(timed(decode_all, dec, data, probes, bs)[0])
        t.setdefault("forward", []).append(timed(forward_all, embedder, pixels, bs)[0])
        if replicas is not None:
            t.setdefault("forward_replicas", []).append(timed(forward_replicas, embedder, pixels, bs, replicas)[0])
        for b in sweep:
            t.setdefault(f"forward@{b}", []).append(timed(forward_all, embedder, pixels, b)[0])
        for dec in extract_decoders:
            flag = "auto" if dec == auto else dec
            cache = Path(tempfile.mkdtemp(prefix=f"cache-{dec}-", dir=work))  # cold: always a new, empty dir
            out = run_extract(images, cache, args, flag)
            t.setdefault(f"extract:{dec}", []).append(out["seconds"])
            cfgs[dec], stages[dec], names[dec] = out["cfg"], out["stages"], out["decoder"]
            if dec == auto:
                t.setdefault("warm", []).append(run_extract(images, cache, args, flag)["seconds"])
        seconds, naive_emb = naive(images, spec, 32, work)
        t.setdefault("naive", []).append(seconds)
        print(f"repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    if replicas is not None:
        replicas.shutdown()

    extract_emb = {dec: cached_embeddings(cfgs[dec]) for dec in extract_decoders}
    agreement = {"naive_vs_pil": cosines(naive_emb, extract_emb["pil"])}
    for dec in extract_decoders[1:]:
        agreement[f"pil_vs_{dec}"] = cosines(extract_emb["pil"], extract_emb[dec])
        agreement[f"naive_vs_{dec}"] = cosines(naive_emb, extract_emb[dec])

    rate = {k: round(n / statistics.median(v), 1) for k, v in t.items()}
    cold, warm = med(t[f"extract:{auto}"]), round(statistics.median(t["warm"]), 4)
    res = {
        "backbone": spec.name, "images": n, "repeats": args.repeats, "batch_size": bs, "device": str(device),
        "precision": precision, "extract_decoder": names[auto],
        "decode_img_s": {k.split(":")[1]: v for k, v in rate.items() if k.startswith("decode:")},
        "forward_img_s": rate["forward"],
        "forward_img_s_replicas": rate.get("forward_replicas"),
        "forward_img_s_by_batch": {k.split("@")[1]: v for k, v in rate.items() if k.startswith("forward@")},
        "extract_img_s": rate[f"extract:{auto}"],
        "extract_img_s_by_decoder": {k.split(":")[1]: v for k, v in rate.items() if k.startswith("extract:")},
        "naive_img_s": rate["naive"],
        "cold_seconds": cold, "warm_seconds": warm,
        "head_fit_seconds": round(head_fit_seconds(cfgs[auto]), 3),
        "finetune_epoch_seconds": round(finetune_epoch_seconds(cfgs[auto], work / "finetuned"), 2),
        "finetune_epoch_what": "featpipe.train.finetune, 1 epoch: last 3 blocks + head, augmented, + val pass, "
                               "decoding included",
        "extract_stage_seconds": stages[auto], "agreement_cosine": agreement,
        "raw_seconds": {k: [round(x, 4) for x in v] for k, v in t.items()},
    }
    res["extract_vs_forward"] = round(res["extract_img_s"] / res["forward_img_s"], 3)
    res["extract_vs_forward_replicas"] = (round(res["extract_img_s"] / res["forward_img_s_replicas"], 3)
                                          if replicas is not None else None)
    res["extract_vs_naive"] = round(res["extract_img_s"] / res["naive_img_s"], 2)
    res["cold_vs_warm"] = round(cold / warm, 1)
    res["machine"] = {**info, "loadavg_end": os.getloadavg()}
    return res


def table(res: dict) -> str:
    rows = [*(f"decode-only {k:<18} {v:>9.1f} img/s" for k, v in res["decode_img_s"].items()),
            f"forward-only (bs {res['batch_size']}, {res['precision']}) {res['forward_img_s']:>9.1f} img/s",
            *(f"forward-only bs {k:<14} {v:>9.1f} img/s" for k, v in res["forward_img_s_by_batch"].items()),
            *([f"forward-only, 1 model/core    {res['forward_img_s_replicas']:>9.1f} img/s"]
              if res["forward_img_s_replicas"] else []),
            *(f"extract --decoder {k:<12} {v:>9.1f} img/s" for k, v in res["extract_img_s_by_decoder"].items()),
            f"naive torchvision fp32       {res['naive_img_s']:>9.1f} img/s",
            f"cold extract                 {res['cold_seconds']:>9.2f} s",
            f"warm re-run                  {res['warm_seconds']:>9.3f} s",
            f"head fit (logistic, CV'd C)  {res['head_fit_seconds']:>9.2f} s",
            f"fine-tune epoch              {res['finetune_epoch_seconds']:>9.2f} s",
            f"extract / forward-only       {res['extract_vs_forward']:>9.3f}  (target >= 0.85)",
            *([f"extract / 1 model/core       {res['extract_vs_forward_replicas']:>9.3f}"]
              if res["forward_img_s_replicas"] else []),
            f"extract / naive              {res['extract_vs_naive']:>9.2f}  (target >= 3)",
            f"cold / warm                  {res['cold_vs_warm']:>9.1f}  (target >= 50)",
            *(f"cosine {k:<21} min {v['min']:.4f} median {v['median']:.4f}"
              for k, v in res["agreement_cosine"].items())]
    m = res["machine"]
    head = (f"{res['backbone']}, {res['images']} images, medians of {res['repeats']}, {res['device']}, "
            f"extract decoder {res['extract_decoder']}\n{m['cpu']} ({m['cores_usable']} usable cores), torch "
            f"{m['torch']}, commit {m['commit']}, {m['date']}, load avg {m['loadavg_start'][0]:.1f}")
    return head + "\n" + "\n".join(rows)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: featpipe's own default for the device")
    p.add_argument("--sweep", default="", help="extra forward-only batch sizes, e.g. 16,32,64")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workdir", default=None, help="where images and caches go (default: a new temp dir)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--small", action="store_true", help="CI size: 200 images, 1 repeat")
    args = p.parse_args(argv)
    if args.small:
        args.images, args.repeats = 200, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    res = bench(args)
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
