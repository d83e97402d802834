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


def capped(x, softcap):
    """s tanh(f / s) element by element (math.tanh), or x itself without a softcap."""
    x = np.asarray(x, np.float64)
    if not softcap:
        return x
    return np.array([[softcap * math.tanh(v / softcap) for v in row] for row in x]).reshape(x.shape)


def label_correct(row, k):
    """1.0 when label k attains the row maximum (ties count), 0.0 for a row holding a NaN or
    whose maximum is not finite."""
    if any(math.isnan(v) for v in row):
        return 0.0
    m = max(row)
    return 1.0 if math.isfinite(m) and row[k] == m else 0.0


def sce(x, target, *, kind, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
        reduction="mean", softcap=None, stats=False):
    """Returns (loss, grad) in float64 for 2-D x; grad is d(loss)/dx of the reduced loss
    (of sum_i L_i for reduction="none").

    With ``softcap=s`` the loss reads g = s tanh(x / s) and the gradient is d loss/dg times
    1 - tanh^2(x / s).  A label outside [0, C) other than ignore_index gives a NaN row (loss
    and gradient), outside the mean's denominator.  ``stats=True`` also returns
    (z_loss part, accuracy, lse), reduced like the loss (per row for "none": z lse^2, 0 for
    ignored rows; 1.0 / 0.0, NaN for ignored rows), lse of every row.  Under "mean" the
    z-loss part is divided by the number of non-ignored rows, the rest by the weight sum.
    """
    f = np.asarray(x, np.float64)
    x = capped(f, softcap)
    n, c = x.shape
    w = np.ones(c) if weight is None else np.asarray(weight, np.float64)
    eps = float(label_smoothing)
    rows = np.zeros(n)
    grad = np.zeros((n, c))
    grad_z = np.zeros((n, c))  # the z-loss term's part of grad
    z_rows = np.zeros(n)
    count = 0  # non-ignored rows with a label in [0, C): the z-loss mean's denominator
    acc_rows = np.full(n, math.nan)
    lse_rows = np.array([lse_row(x[i]) for i in range(n)]) if n else np.zeros(0)
    denom = 0.0
    for i in range(n):
        t = np.zeros(c)
        if kind == "label":
            k = int(target[i])
            if k == ignore_index:
                continue
            z_rows[i] = z_loss * lse_rows[i] ** 2 if z_loss else 0.0
            if not 0 <= k < c:
                rows[i] = math.nan
                grad[i, :] = math.nan
                acc_rows[i] = 0.0
                continue
            acc_rows[i] = label_correct(list(x[i]), k)
            denom += w[k]
            count += 1
            t[k] += (1 - eps) * w[k]
            for j in range(c):
                t[j] += eps / c * w[j]
        else:
            z_rows[i] = z_loss * lse_rows[i] ** 2 if z_loss else 0.0
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
            dg = q * (tsum + 2 * z_loss * lse) - t[j]
            dz = q * 2 * z_loss * lse
            if softcap:
                th = math.tanh(f[i, j] / softcap)
                dg *= 1.0 - th * th
                dz *= 1.0 - th * th
            grad[i, j] = dg
            grad_z[i, j] = dz
    if kind == "prob":
        denom = float(n)
        count = n
    counted = int(np.sum(~np.isnan(acc_rows)))
    accuracy = float(np.nansum(acc_rows) / counted) if counted else math.nan
    if reduction == "none":
        out = rows, grad
        st = (z_rows, acc_rows if kind == "label" else None, lse_rows)
    elif reduction == "sum":
        out = rows.sum(), grad
        st = (z_rows.sum(), accuracy if kind == "label" else None, lse_rows)
    elif denom == 0:
        out = 0.0, np.zeros_like(grad)
        st = (0.0, accuracy if kind == "label" else None, lse_rows)
    else:
        # "mean": the cross-entropy part over the weight sum, the z-loss part over the count of
        # rows (unweighted: Liger-Kernel's definition); the same denominator without weights
        zsum = z_rows.sum()
        out = ((rows.sum() - zsum) / denom + zsum / count,
               (grad - grad_z) / denom + grad_z / count)
        st = (zsum / count, accuracy if kind == "label" else None, lse_rows)
    return out + (st,) if stats else out


def predicted(x, softcap=None):
    """The predicted class of each row of 2-D x, written out: the first index of the row's
    maximum of the (capped, in float64) logits; -1 for a row holding a NaN."""
    g = capped(np.asarray(x, np.float64), softcap)
    out = np.full(g.shape[0], -1, np.int64)
    for i, row in enumerate(g):
        if any(math.isnan(v) for v in row):
            continue
        best = 0
        for j in range(1, len(row)):
            if row[j] > row[best]:
                best = j
        out[i] = best
    return out
