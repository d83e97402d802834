"""A deliberately slow float64 reference, independent of gpuce's code.

Per-row Python loops; the log-sum-exp is ``np.logaddexp.reduce``; the loss is
``-sum_c t_c log q_c`` written from the definition with the full target vector
t (label one-hot, smoothing and weights folded in), and the gradient is
``q_j sum_c t_c - t_j`` plus the z-loss term, element by element.
"""

import math

import numpy as np


def lse_row(row):
    return float(np.logaddexp.reduce(np.asarray(row, np.float64)))


def bad_row(row):
    row = np.asarray(row, np.float64)
    return bool(np.isnan(row).any() or np.isposinf(row).any() or np.all(np.isneginf(row)))


def softmax_rows(x):
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        lse = lse_row(x[i])
        for j in range(x.shape[1]):
            out[i, j] = math.exp(x[i, j] - lse) if not math.isnan(x[i, j] - lse) else math.nan
    return out


def sce(x, target, *, kind, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
        reduction="mean"):
    """Returns (loss, grad) in float64 for 2-D x; grad is d(loss)/dx of the reduced loss
    (of sum_i L_i for reduction="none")."""
    x = np.asarray(x, np.float64)
    n, c = x.shape
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    eps = float(label_smoothing)
    rows = np.zeros(n)
    grad = np.zeros((n, c))
    denom = 0.0
    for i in range(n):
        t = np.zeros(c)
        if kind == "label":
            k = int(target[i])
            if k == ignore_index:
                continue
            denom += w[k]
            t[k] += (1 - eps) * w[k]
            for j in range(c):
                t[j] += eps / c * w[j]
        else:
            denom += 1.0
            for j in range(c):
                t[j] = w[j] * ((1 - eps) * float(target[i, j]) + eps / c)
        if bad_row(x[i]):
            rows[i] = math.nan
            grad[i, :] = math.nan
            continue
        lse = lse_row(x[i])
        loss = 0.0
        for j in range(c):
            if t[j] != 0.0:
                loss += t[j] * (lse - x[i, j])
        loss += z_loss * lse * lse
        rows[i] = loss
        tsum = sum(t)
        for j in range(c):
            q = math.exp(x[i, j] - lse)
            grad[i, j] = q * (tsum + 2 * z_loss * lse) - t[j]
    if kind == "prob":
        denom = float(n)
    if reduction == "none":
        return rows, grad
    if reduction == "sum":
        return rows.sum(), grad
    if denom == 0:
        return 0.0, np.zeros_like(grad)
    return rows.sum() / denom, grad / denom
