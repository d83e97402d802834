"""The accuracy of 16-bit linear cross-entropy against float64 of the same values, on the CPU:
per-row lse and the mean loss of gpuce.linear_cross_entropy (float32 chunk logits) beside the
16-bit logits that F.linear gives in the inputs' dtype (what gpuce kept before, and what
``F.cross_entropy(F.linear(...))`` computes in bfloat16).

The shape is Cut Cross-Entropy's benchmark shape (8192 tokens, hidden 2048, vocabulary
256000) scaled to a 2-core CPU: rows and vocabulary divided by 16, the hidden size kept (the
error of a logit grows with the length of its dot product).  Hidden states and the head are
drawn at the scale of a trained model's final layer (unit-variance rows, W of std 1/sqrt(D)
times 4, logits of std about 4).

    python -m bench.lce_accuracy [--rows 512] [--hidden 2048] [--vocab 16000]

Prints one CSV row per dtype: max |Δlse|, mean |Δlse|, |Δloss| for both paths.
"""

from __future__ import annotations

import argparse

import numpy as np

import gpuce


def measure(rows, hidden, vocab, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, hidden)).astype(dtype)
    W = (rng.standard_normal((vocab, hidden)) * (4.0 / np.sqrt(hidden))).astype(dtype)
    y = rng.integers(0, vocab, rows)
    X64, W64 = X.astype(np.float64), W.astype(np.float64)
    f64 = X64 @ W64.T
    m = f64.max(1, keepdims=True)
    lse64 = np.log(np.exp(f64 - m).sum(1)) + m[:, 0]
    loss64 = float(np.mean(lse64 - f64[np.arange(rows), y]))
    loss, st = gpuce.linear_cross_entropy(X, W, y, return_stats=True)
    d_lse = np.abs(st.lse.astype(np.float64) - lse64)
    # 16-bit logits: the float32-accumulated product rounded to the inputs' dtype once
    f16 = (X.astype(np.float32) @ W.astype(np.float32).T).astype(dtype).astype(np.float64)
    m16 = f16.max(1, keepdims=True)
    lse16 = np.log(np.exp(f16 - m16).sum(1)) + m16[:, 0]
    loss16 = float(np.mean(lse16 - f16[np.arange(rows), y]))
    d16 = np.abs(lse16 - lse64)
    return dict(dtype=np.dtype(dtype).name, rows=rows, hidden=hidden, vocab=vocab,
                gpuce_max_lse_err=d_lse.max(), gpuce_mean_lse_err=d_lse.mean(),
                gpuce_loss_err=abs(float(loss) - loss64),
                logits16_max_lse_err=d16.max(), logits16_mean_lse_err=d16.mean(),
                logits16_loss_err=abs(loss16 - loss64))


def main(argv=None):
    import ml_dtypes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=16000)
    a = p.parse_args(argv)
    rows = [measure(a.rows, a.hidden, a.vocab, dt) for dt in (ml_dtypes.bfloat16, np.float16)]
    print(",".join(rows[0]))
    for r in rows:
        print(",".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()))


if __name__ == "__main__":
    main()
