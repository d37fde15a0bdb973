"""L2-penalised multinomial logistic regression by L-BFGS: sklearn's `LogisticRegression(solver="lbfgs")` at scale.

The objective is sklearn's (mean log-loss + ||W||^2 / (2 C n), intercept unpenalised; two classes: one weight vector
and a sigmoid) and so is the optimiser (scipy's L-BFGS-B with sklearn's settings, from the same start):
tests/test_heads.py holds the optimum to sklearn's on real features. What differs is the data: `Rows` is a view of
standardised training rows that is never materialised (X held once, in float32 or float16, whatever the folds), read
in chunks so that each step makes one pass over X, with numpy on the CPU or torch on a GPU (array-api-compat: one
code path for both). Only the O(K d) optimiser state crosses to the CPU each step.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Iterator

import numpy as np
from array_api_compat import array_namespace, device as device_of, is_numpy_array, to_device
from scipy.optimize import minimize  # at import: heads.one_thread() can only pin the BLAS libraries already loaded


@dataclass(frozen=True)
class Chunk:
    pos: slice  # the rows' positions in Rows.idx
    X: Any  # the rows of X, cast to the working dtype, on X's device
    norm: Any  # their norm factors

@dataclass(frozen=True)
class Rows:
    """Z = (X[idx] * norm[idx, None] - mean) / scale, computed a chunk at a time, never whole.

    X: a numpy array or a torch tensor on any device, in any float dtype; chunks are cast to `dtype` (float64 for
    a reference-grade fit). `norm` is a per-row factor of X (the heads' unit normalisation); idx selects the rows."""

    X: Any
    idx: np.ndarray  # int64 rows of X, in order
    norm: np.ndarray  # float32 (len(X),)
    mean: np.ndarray  # float32 (d,)
    scale: np.ndarray  # float32 (d,)
    dtype: str = "float32"
    chunk: int = 2048  # rows per product: 10 MiB at 1280 float32, so a chunk's two products hit the cache

    @classmethod
    def of(cls, Z, dtype: str = "float32") -> "Rows":
        """A matrix taken as it is: every row, factor 1, no standardisation (or one already applied)."""
        n, d = Z.shape
        return cls(Z, np.arange(n), np.ones(n, np.float32), np.zeros(d, np.float32), np.ones(d, np.float32), dtype)

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])

    @property
    def on_numpy(self) -> bool:
        """X is a numpy array (the CPU path), not a torch tensor."""
        return is_numpy_array(self.X)

    def subset(self, positions: np.ndarray) -> "Rows":
        return replace(self, idx=self.idx[positions])

    def put(self, a: np.ndarray, dtype: str | None = None):
        """A numpy array moved to where X lives (cast to the working dtype unless `dtype` says otherwise)."""
        xp = array_namespace(self.X)
        return xp.asarray(np.asarray(a, dtype or self.dtype), device=device_of(self.X))

    def chunks(self) -> Iterator[Chunk]:
        """The rows a chunk at a time, in order, on X's device: slices of X where idx is a range, else gathered;
        with numpy into one reused buffer (a fresh 10 MiB array per chunk costs page faults; bench/README.md)."""
        xp, numpy = array_namespace(self.X), self.on_numpy
        step = self.chunk if numpy else 32 * self.chunk  # a GPU wants bigger products; torch reuses memory itself
        n = len(self.idx)
        whole = n > 0 and self.idx[-1] - self.idx[0] == n - 1 and bool(np.all(np.diff(self.idx) == 1))
        buf = np.empty((min(step, n), self.dim), self.X.dtype) if numpy and not whole else None
        for s in range(0, n, step):
            rows = self.idx[s:s + step]
            if whole:
                part = self.X[int(rows[0]):int(rows[-1]) + 1]
            elif numpy:  # mode="clip": with the default "raise", numpy gathers into a temporary, then copies
                part = np.take(self.X, rows, axis=0, out=buf[:len(rows)], mode="clip")
            else:
                part = xp.take(self.X, self.put(rows, "int64"), axis=0)
            yield Chunk(slice(s, s + len(rows)), xp.astype(part, getattr(xp, self.dtype), copy=False),
                        self.put(self.norm[rows]))

    def materialised(self) -> "Rows":
        """The standardised rows as one plain matrix: for small sets, where a copy is cheap and a step's fixed
        costs (a gather per chunk) would outweigh its products."""
        return Rows.of(self.dense(np.arange(len(self))), self.dtype)

    def dense(self, positions: np.ndarray):
        """Standardised rows `positions` as one array on X's device (an MLP minibatch)."""
        part = self.subset(positions)
        xp = array_namespace(self.X)
        Xc = xp.astype(xp.take(self.X, self.put(part.idx, "int64"), axis=0), getattr(xp, self.dtype))
        return (Xc * self.put(self.norm[part.idx])[:, None] - self.put(self.mean)) / self.put(self.scale)


@dataclass
class LogReg:
    classes: np.ndarray  # the labels seen in training, sorted
    coef: np.ndarray  # float32 (1 or K, d): one row for two classes (the second one's logit), else one per class
    intercept: np.ndarray  # float32 (1 or K,)
    converged: bool
    steps: int = 0  # objective evaluations the fit took

    def evaluate(self, rows: Rows, y: np.ndarray) -> tuple[float, float]:
        """(accuracy, mean log-loss) on rows labelled y, a chunk at a time."""
        xp = array_namespace(rows.X)
        Vt, c = _fold(np.asarray(self.coef, np.float64), np.asarray(self.intercept, np.float64), rows)
        pos = np.searchsorted(self.classes, y)
        known = self.classes[np.minimum(pos, len(self.classes) - 1)] == y  # a class this model never saw: wrong
        target, knownf = rows.put(np.where(known, pos, 0), "int64"), rows.put(known)
        hits = loss = 0.0
        for ch in rows.chunks():
            logits = _logits(xp, ch.X, ch.norm, Vt, c, len(self.coef))
            logp = logits - _logsumexp(xp, logits)[:, None]
            t, ok = target[ch.pos], knownf[ch.pos]
            hits += float(xp.sum(ok * xp.astype(xp.argmax(logits, axis=1) == t, ok.dtype)))
            held = xp.take_along_axis(logp, t[:, None], axis=1)[:, 0]
            held = xp.where(ok > 0, xp.maximum(held, -34.5), -34.5)  # log(1e-15): sklearn's clip; unknown: wrong
            loss -= float(xp.sum(held))
        return hits / len(y), loss / len(y)

    def predict_proba(self, Z: np.ndarray) -> np.ndarray:
        """(n, len(classes)) probabilities for plain standardised rows (numpy)."""
        raw = Z @ self.coef.T + self.intercept
        return softmax(np.concatenate([np.zeros_like(raw), raw], axis=1) if len(self.coef) == 1 else raw)


def fit(rows: Rows, y: np.ndarray, C: float, init: LogReg | None = None, max_iter: int = 100,
        tol: float = 1e-4, threads: int = 1) -> LogReg:
    """Minimise sklearn's objective on `rows` labelled y; `init` warm-starts from a fit on the same classes.

    `threads` > 1 (numpy rows): each thread takes a contiguous share of the rows and its partial sums add up in a
    fixed order. The callers pin BLAS to one thread: its own threads do not speed up products this thin (10
    columns), and slow down scipy's optimiser (bench/README.md, heads at scale)."""
    classes, yi = np.unique(y, return_inverse=True)
    k = 1 if len(classes) == 2 else len(classes)
    theta0 = np.zeros(k * (rows.dim + 1)) if init is None else np.concatenate([init.coef.ravel(), init.intercept])
    bounds = np.linspace(0, len(rows), (threads if rows.on_numpy else 1) + 1).astype(int)
    parts = [(rows.subset(np.arange(a, b)), rows.put(yi[a:b], "int64")) for a, b in zip(bounds, bounds[1:]) if b > a]
    with ThreadPoolExecutor(len(parts)) if len(parts) > 1 else nullcontext() as pool:
        res = minimize(_loss_grad, theta0, args=(parts, pool, len(classes), k, len(rows), 1.0 / (C * len(rows))),
                       method="L-BFGS-B", jac=True,
                       options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    coef, intercept = _unpack(res.x, k, rows.dim)
    return LogReg(classes, coef.astype(np.float32), intercept.astype(np.float32), bool(res.success), int(res.nfev))


def _unpack(theta: np.ndarray, k: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    return theta[:k * d].reshape(k, d), theta[k * d:]


def _fold(W: np.ndarray, b: np.ndarray, rows: Rows):
    """Weights on Z as weights on raw X: Z W^T + b = norm * (X V^T) + c with V = W / scale, c = b - V mean."""
    V = W / rows.scale
    return rows.put(V.T), rows.put(b - V @ rows.mean, "float64")


def _logits(xp, Xc, nc, Vt, c, k: int):
    """float64 logits from a product in the working dtype."""
    raw = xp.astype(Xc @ Vt, xp.float64) * xp.astype(nc, xp.float64)[:, None] + c
    return xp.concat([xp.zeros_like(raw), raw], axis=1) if k == 1 else raw


def _logsumexp(xp, logits):
    top = xp.max(logits, axis=1)
    return xp.log(xp.sum(xp.exp(logits - top[:, None]), axis=1)) + top


def _loss_grad(theta: np.ndarray, parts, pool, n_classes: int, k: int, n: int, l2: float) -> tuple[float, np.ndarray]:
    """Mean log-loss + l2/2 ||W||^2 and its gradient, one pass over the rows. Two classes: the first class's logit
    is fixed at 0, so the softmax is sklearn's sigmoid and the penalty falls on its one vector."""
    W, b = _unpack(theta, k, parts[0][0].dim)
    sums = [_sums(W, b, *part, n_classes, k) for part in parts] if pool is None else \
        list(pool.map(lambda part: _sums(W, b, *part, n_classes, k), parts))
    loss, gX, gsum = (sum(s[i] for s in sums) for i in range(3))
    rows = parts[0][0]
    grad_w = (gX / n - gsum[:, None] / n * rows.mean) / rows.scale + l2 * W
    return loss / n + 0.5 * l2 * float(np.sum(W * W)), np.concatenate([grad_w.ravel(), gsum / n])


def _sums(W: np.ndarray, b: np.ndarray, rows: Rows, target, n_classes: int, k: int):
    """Summed log-loss, G^T (X * norm) and G's column sums (G: d loss / d logits) over `rows`, chunk by chunk.

    The products run in the working dtype; everything per logit in float64 (it is n x K, cheap): with a float32
    loss, rounding noise near the optimum failed the line search's decrease test, several evaluations a step."""
    xp = array_namespace(rows.X)
    Vt, c = _fold(W, b, rows)
    classes = rows.put(np.arange(n_classes), "int64")
    loss, gX, gsum = 0.0, 0.0, 0.0
    for ch in rows.chunks():
        logits = _logits(xp, ch.X, ch.norm, Vt, c, k)
        onehot = xp.astype(target[ch.pos][:, None] == classes, logits.dtype)
        lse = _logsumexp(xp, logits)
        loss += float(xp.sum(lse - xp.sum(logits * onehot, axis=1)))
        G = (xp.exp(logits - lse[:, None]) - onehot)[:, n_classes - k:]
        gsum = gsum + xp.sum(G, axis=0)
        gX = gX + xp.astype(G * ch.norm[:, None], ch.X.dtype).T @ ch.X  # the chunk's other product, still in cache
    return loss, host(gX), host(gsum)


def host(a) -> np.ndarray:
    """A numpy or torch array (any device) as a float64 numpy array on the CPU."""
    return np.asarray(to_device(a, "cpu"), np.float64)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
