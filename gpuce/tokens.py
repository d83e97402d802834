"""Token log-probabilities and entropy (the quantities of PPO/GRPO-style training), from logits
or straight from hidden states.

For row i with logits f_i (class axis last), its token k_i, a temperature τ and an optional
softcap s (v = s tanh(f / s), applied before the temperature; v = f without), the row reads
u_i = v_i / τ and q_i = softmax(u_i):

    log p_i = u_{i,k_i} − logsumexp(u_i),      H_i = −Σ_j q_ij log q_ij = logsumexp(u_i) − Σ_j q_ij u_ij

Both are differentiable: the gradient of Σ_i g_l,i log p_i + g_H,i H_i with respect to the
logits is

    ∂/∂f_ij = (1/τ) (g_l,i ([j = k_i] − q_ij) − g_H,i q_ij (log q_ij + H_i))   (times
              1 − tanh²(f_ij / s) with a softcap)

Rows whose token equals ``ignore_index`` give log p = H = 0 and a zero gradient row.  The
linear form never holds the N × C logits: it runs on the chunk driver of :mod:`gpuce._chunks`.
"""

from __future__ import annotations

import numpy as np

from . import _dask
from ._backend import array_module, asarray
from ._chunks import chunk_rows, run_chunks
from ._dispatch import backends
from ._results import LinearGrads
from ._rows import check_labels, run_token_rows
from ._validation import (ShapeOnly, check_chunk_size, check_flag, check_linear_args,
                          check_row_grads, check_uint64_labels, token_args)


def _outputs(args, logp, entropy, grad):
    out = (logp,)
    if args.return_entropy:
        out += (entropy,)
    if args.return_grad:
        out += (grad,)
    return out[0] if len(out) == 1 else out


@backends("logits", "target", "grad_logprobs", "grad_entropy",
          dask=lambda run, arguments: _dask.token_logprobs(run, **arguments))
def token_logprobs(logits, target, *, temperature=1.0, return_entropy=False, softcap=None,
                   ignore_index=-100, return_grad=False, grad_logprobs=None, grad_entropy=None,
                   _labels_checked=False):
    r"""Each token's log-probability under softmax(logits / temperature), and the entropy of
    that softmax, per row.

    ``log p_i = u_{i,k_i} − logsumexp(u_i)`` and ``H_i = logsumexp(u_i) − Σ_j q_ij u_ij``
    with ``u_i = cap(f_i) / temperature`` and ``q_i = softmax(u_i)`` (see the module docstring).

    Parameters
    ----------
    logits : (..., C) float array, NumPy or CuPy (float16, bfloat16, float32, float64)
    target : (...) integer array
        Each row's token, in [0, C) or equal to ``ignore_index`` (anything else is a
        ValueError, checked before any work).
    temperature : float > 0, finite
        The sampling temperature τ: every formula reads f / τ.
    return_entropy : bool
        Also return H per row.
    softcap : float > 0, optional
        The logits are capped first, ``s tanh(f / s)``, then divided by τ.
    ignore_index : int
        Rows whose token equals it give log p = 0, H = 0 and a zero gradient row.
    return_grad : bool
        Also return the gradient, with respect to ``logits``, of
        ``Σ_i grad_logprobs_i log p_i + grad_entropy_i H_i``, in the logits' dtype (rounded
        once from the accumulation dtype).
    grad_logprobs, grad_entropy : (...) real arrays, optional (with return_grad)
        The incoming gradients of the two outputs; ``None`` is 0 (so ``return_grad=True``
        without either returns a zero gradient: pass ``grad_logprobs=np.ones(...)`` for the
        gradient of Σ log p).

    Returns
    -------
    logp, (logp, entropy), (logp, grad) or (logp, entropy, grad)
        logp and entropy have the rows' shape (...), float32 for 16-bit and float32 logits,
        float64 for float64.  A row whose (capped, tempered) maximum is not finite (a NaN, a
        +inf, every entry −inf) gives NaN in both and a NaN gradient row.  Entropy is ≥ 0 and
        ≤ log C up to rounding (it is not clamped).

    ``logits`` may be a dask array chunked by rows (the class axis whole); the results are
    then dask arrays.
    """
    xp = array_module(logits, target, grad_logprobs, grad_entropy)
    logits, target, grad_logprobs, grad_entropy = (
        asarray(xp, a) for a in (logits, target, grad_logprobs, grad_entropy))
    args = token_args(logits, target, temperature=temperature, softcap=softcap,
                      ignore_index=ignore_index, return_entropy=return_entropy,
                      return_grad=return_grad)
    g_logp, g_entropy = check_row_grads(xp, args, grad_logprobs, grad_entropy)
    check_uint64_labels(xp, target, args)
    if args.n and not _labels_checked:  # the torch backward's labels were checked forward
        check_labels(xp, target, args)
    c = args.c
    x2 = logits.reshape(args.n, c)
    labels = target.reshape(args.n)
    logp = xp.empty(args.n, args.acc)
    entropy = xp.empty(args.n, args.acc) if args.return_entropy else None
    grad = xp.empty((args.n, c), logits.dtype) if args.return_grad else None
    run_token_rows(xp, x2, labels, args, logp, entropy, grad, g_logp, g_entropy)
    lead = args.lead_shape
    return _outputs(args, logp.reshape(lead), None if entropy is None else entropy.reshape(lead),
                    None if grad is None else grad.reshape(logits.shape))


@backends("X", "target", "grad_logprobs", "grad_entropy",
          dask=lambda run, arguments: _dask.linear_token_logprobs(run, **arguments))
def linear_token_logprobs(X, W, target, *, bias=None, temperature=1.0, return_entropy=False,
                          softcap=None, ignore_index=-100, chunk_size=None, return_grad=False,
                          input_grad=True, grad_logprobs=None, grad_entropy=None,
                          check_finite=True, _acc_grads=False, _labels_checked=False):
    r""":func:`token_logprobs` of the logits f = X Wᵀ (+ bias), never holding all N × C of them.

    The logits are formed a chunk of ``chunk_size`` rows at a time (as
    :func:`gpuce.linear_cross_entropy`: chosen from the problem and the free memory when None),
    in the accumulation dtype (16-bit X and W: 16-bit GEMM inputs, float32 logits); the row
    statistics and, with ``return_grad``, the chunk's gradient G = ∂/∂f are formed in place,
    then dX = G W, dW += Gᵀ X and db += Σ G.

    Parameters
    ----------
    X : (N, D) float array;  W : (C, D) of X's dtype;  target : (N,) integer tokens
    bias : (C,) array, optional
    temperature, return_entropy, softcap, ignore_index, grad_logprobs, grad_entropy
        As in :func:`token_logprobs`.
    chunk_size : int, optional
        Rows a chunk; results do not depend on it beyond rounding.
    return_grad : bool
        Also return :class:`gpuce.LinearGrads` ``(X, W, bias)`` of
        ``Σ_i grad_logprobs_i log p_i + grad_entropy_i H_i``, in X's dtype (16-bit: dW
        accumulated in float32 and rounded once).
    input_grad : bool
        Compute dX (grads.X is None without).
    check_finite : bool
        Reject non-finite X, W, bias up front.

    X may also be a dask array chunked by rows (W and bias in memory); the results are then
    dask arrays.  (``_acc_grads``, private: gradients left in the accumulation dtype, for the
    dask path to sum its blocks' dW and round once.)

    Returns
    -------
    As :func:`token_logprobs`, with :class:`gpuce.LinearGrads` in place of the logits' gradient.
    """
    xp = array_module(X, W, target, bias, grad_logprobs, grad_entropy)
    X, W, target, bias, grad_logprobs, grad_entropy = (
        asarray(xp, a) for a in (X, W, target, bias, grad_logprobs, grad_entropy))
    if target.ndim != 1:
        raise ValueError(f"target must be (N,) integer tokens, got shape {target.shape}")
    if np.dtype(target.dtype).kind not in "iu":
        raise TypeError(f"target must be integer token ids (class labels), got {target.dtype}")
    check_linear_args(xp, X, W, target, bias, 0.0, check_flag(check_finite, "check_finite"))
    chunk_size = check_chunk_size(chunk_size)
    input_grad = check_flag(input_grad, "input_grad")
    n, d = X.shape
    c = W.shape[0]
    args = token_args(ShapeOnly((n, c), X.dtype), target, temperature=temperature,
                      softcap=softcap, ignore_index=ignore_index, return_entropy=return_entropy,
                      return_grad=return_grad)
    g_logp, g_entropy = check_row_grads(xp, args, grad_logprobs, grad_entropy)
    check_uint64_labels(xp, target, args)
    if n and not _labels_checked:
        check_labels(xp, target, args)
    acc = args.acc
    W = xp.ascontiguousarray(W)
    logp = xp.empty(n, acc)
    entropy = xp.empty(n, acc) if args.return_entropy else None
    dX = dW = db = None
    if args.return_grad:
        dW = xp.zeros(W.shape, acc if W.dtype != acc else W.dtype)
        dX = xp.empty((n, d), acc if _acc_grads else X.dtype) if input_grad else None
        db = xp.zeros(c, acc) if bias is not None else None
    grads_bytes = (dW.nbytes + (dX.nbytes if dX is not None else 0)) if args.return_grad else 0
    rows = chunk_rows(xp, X, c, acc, chunk_size, backward=args.return_grad,
                      grads_bytes=grads_bytes)

    def row_op(s, e, f):
        """log p and H of rows s:e from their logits f; f becomes G_c when asked."""
        run_token_rows(xp, f, target[s:e], args, logp[s:e],
                       None if entropy is None else entropy[s:e],
                       f if args.return_grad else None,
                       None if g_logp is None else g_logp[s:e],
                       None if g_entropy is None else g_entropy[s:e])

    run_chunks(xp, X, W, bias, acc, rows, row_op, dW=dW, dX=dX, db=db)
    grads = None
    if args.return_grad:
        if _acc_grads:
            grads = LinearGrads(dX, dW, db)
        else:  # the float32 accumulation of 16-bit dW rounded once
            grads = LinearGrads(dX, dW.astype(W.dtype, copy=False),
                                None if db is None else db.astype(X.dtype))
    return _outputs(args, logp, entropy, grads)
