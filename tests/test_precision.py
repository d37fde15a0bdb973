"""bf16 autocast is extract's default where the hardware has bf16 units; it must not change what the features say.

Both precisions run the real extract path (decoder, Embedder, cache) on the shipped photos; the comparison is per
image (cosine) and downstream (the logistic head's cross-validated accuracy on the same stratified folds).
"""

from __future__ import annotations

import numpy as np
import pytest

from featpipe.extract import ExtractConfig
from featpipe.features import Features, load_features
from featpipe.heads import HeadConfig, cross_validate


@pytest.fixture(scope="module")
def by_precision(tmp_path_factory) -> dict[str, Features]:
    d = tmp_path_factory.mktemp("precision")
    return {p: load_features(ExtractConfig(cache_dir=d / p, precision=p, decoder="pil"), progress=False)
            for p in ("fp32", "bf16")}


def test_bf16_embeddings_match_fp32_per_image(by_precision):
    fp32, bf16 = by_precision["fp32"], by_precision["bf16"]
    assert fp32.paths == bf16.paths and len(fp32.paths) == 196
    assert (fp32.result.precision, bf16.result.precision) == ("fp32", "bf16")
    a, b = fp32.X, bf16.X
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    # The spec: every image >= 0.99. All-bf16 gave 0.9896 on one photo; featpipe.embed keeps the first convolutions
    # in fp32 (FP32_LEADING_CONVS), which measured 0.9997 here.
    worst = f"worst image cosine {cos.min():.4f} ({fp32.paths[int(cos.argmin())]})"
    assert cos.min() >= 0.99, worst
    assert np.median(cos) >= 0.998, np.median(cos)


def test_bf16_head_accuracy_within_one_point_of_fp32(by_precision):
    cfg = HeadConfig(seed=0)
    acc = {p: cross_validate(f.X, f.y, f.classes, 5, cfg)[0] for p, f in by_precision.items()}
    assert acc["fp32"] > 0.8, acc  # the comparison means something only if the head works at all
    assert abs(acc["bf16"] - acc["fp32"]) <= 0.01, acc
