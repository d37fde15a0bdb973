"""L2-penalised logistic regression by L-BFGS: sklearn's `LogisticRegression(solver="lbfgs")` without sklearn.

Importing sklearn costs more than a warm fit-head on 1,000 cached images may take (its utils import scipy.stats and
pandas), so the head fits its own: sklearn's objective (mean log-loss + ||W||^2 / (2 C n), intercept unpenalised;
two classes: one weight vector and a sigmoid), on the optimiser sklearn itself calls (scipy's L-BFGS-B) with
sklearn's settings, from the same start. tests/test_heads.py holds it to sklearn's solution on real features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize  # at import: heads.one_thread() can only pin the BLAS libraries already loaded


@dataclass
class LogReg:
    classes: np.ndarray  # the labels seen in training, sorted
    coef: np.ndarray  # float32 (1 or K, d): one row for two classes (the second one's logit), else one per class
    intercept: np.ndarray  # float32 (1 or K,)
    converged: bool

    def logits(self, Z: np.ndarray) -> np.ndarray:
        raw = Z @ self.coef.T + self.intercept
        return np.concatenate([np.zeros_like(raw), raw], axis=1) if len(self.coef) == 1 else raw

    def predict_proba(self, Z: np.ndarray) -> np.ndarray:
        """(n, len(classes)) probabilities."""
        return softmax(self.logits(Z))


def fit(Z: np.ndarray, y: np.ndarray, C: float, init: LogReg | None = None, max_iter: int = 100,
        tol: float = 1e-4) -> LogReg:
    """Minimise sklearn's objective; `init` warm-starts from a fit on the same classes (a C path)."""
    classes, yi = np.unique(y, return_inverse=True)
    rows = 1 if len(classes) == 2 else len(classes)
    n, d = Z.shape
    onehot = np.eye(len(classes), dtype=Z.dtype)[yi]
    theta0 = np.zeros(rows * (d + 1)) if init is None else np.concatenate([init.coef.ravel(), init.intercept])
    res = minimize(_loss_grad, theta0, args=(Z, onehot, rows, 1.0 / (C * n)), method="L-BFGS-B", jac=True,
                   options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    coef, intercept = _unpack(res.x, rows, d)
    return LogReg(classes, coef.astype(np.float32), intercept.astype(np.float32), bool(res.success))


def _unpack(theta: np.ndarray, rows: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    return theta[:rows * d].reshape(rows, d), theta[rows * d:]


def _loss_grad(theta: np.ndarray, Z: np.ndarray, onehot: np.ndarray, rows: int, l2: float) -> tuple[float, np.ndarray]:
    """Mean log-loss + l2/2 ||W||^2 and its gradient. Two classes: the first class's logit is fixed at 0, so the
    softmax is sklearn's sigmoid and the penalty falls on its one vector."""
    W, b = _unpack(theta, rows, Z.shape[1])
    raw = Z @ W.T.astype(Z.dtype) + b.astype(Z.dtype)  # all in Z's dtype: a float64 operand would copy Z each call
    logits = np.concatenate([np.zeros_like(raw), raw], axis=1) if rows == 1 else raw
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(axis=1))
    loss = float((lse - (shifted * onehot).sum(axis=1)).mean(dtype=np.float64)) + 0.5 * l2 * float(np.sum(W * W))
    G = (np.exp(shifted - lse[:, None]) - onehot)[:, -rows:] / len(Z)
    grad_w = (G.T @ Z).astype(np.float64) + l2 * W
    return loss, np.concatenate([grad_w.ravel(), G.sum(axis=0, dtype=np.float64)])


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
