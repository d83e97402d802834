"""torch adapter: gpuce's kernels as torch custom operators (``torch.library.custom_op``).

``gpuce.torch.cross_entropy`` is a drop-in for ``torch.nn.functional.cross_entropy`` (same
arguments, class axis 1, integer or probability targets, the same loss dtype) and
``gpuce.torch.linear_cross_entropy`` is a drop-in for torch 2.13's
``torch.nn.functional.linear_cross_entropy`` (same arguments) that never materialises the
N x C logits (gpuce's chunked linear model).  Tensors cross without copies: CUDA tensors
become CuPy arrays through DLPack (the GPU kernels, on torch's current stream), CPU tensors
become NumPy arrays (the NumPy path).  bfloat16 crosses without a copy too: NumPy has no
bfloat16 of its own, so a CPU tensor's int16 view becomes a NumPy array reinterpreted as
``ml_dtypes.bfloat16`` (and results go back the same way); a CUDA one goes through DLPack
where CuPy takes bfloat16 there, else through the same int16 view.

The cross-entropy work is done by five operators in the ``gpuce`` namespace, each with a fake (meta)
implementation giving its outputs' shapes and dtypes, so that ``torch.compile`` treats them
as opaque calls (``fullgraph=True`` traces without a break; nothing of the NumPy/CuPy code is
traced)::

    gpuce::cross_entropy(Tensor logits, Tensor target, Tensor? weight, str reduction,
        SymInt ignore_index, float label_smoothing, float z_loss, bool logits_grad,
        float softcap=0., bool return_stats=False, bool check_labels=True)
        -> (Tensor loss, Tensor grad, Tensor z_loss, Tensor accuracy, Tensor lse,
            Tensor predicted)
    gpuce::cross_entropy_backward(Tensor grad_loss, Tensor logits, Tensor target,
        Tensor? weight, str reduction, SymInt ignore_index, float label_smoothing,
        float z_loss, bool logits_grad, bool target_grad, bool weight_grad,
        float softcap=0., bool check_labels=True)
        -> (Tensor d_logits, Tensor d_target, Tensor d_weight)
    gpuce::linear_cross_entropy(Tensor x, Tensor w, Tensor target, Tensor? bias,
        Tensor? ce_weight, str reduction, SymInt ignore_index, float label_smoothing,
        float z_loss, SymInt? chunk_size, bool x_grad, bool need_grad,
        float softcap=0., bool return_stats=False, bool check_labels=True)
        -> (Tensor loss, Tensor d_x, Tensor d_w, Tensor d_b, Tensor z_loss, Tensor accuracy,
            Tensor lse, Tensor predicted)
    gpuce::linear_cross_entropy_backward(Tensor grad_loss, Tensor x, Tensor w, Tensor target,
        Tensor? bias, Tensor? ce_weight, str reduction, SymInt ignore_index,
        float label_smoothing, float z_loss, SymInt? chunk_size, bool x_grad,
        float softcap=0., bool check_labels=True)
        -> (Tensor d_x, Tensor d_w, Tensor d_b)
    gpuce::linear_cross_entropy_target_backward(Tensor grad_loss, Tensor x, Tensor w,
        Tensor target, Tensor? bias, Tensor? ce_weight, str reduction, float label_smoothing,
        SymInt? chunk_size, bool target_grad, bool weight_grad, float softcap=0.)
        -> (Tensor d_target, Tensor d_ce_weight)

``gpuce.torch.token_logprobs`` and ``gpuce.torch.linear_token_logprobs`` (each token's
log-probability and the softmax's entropy at a temperature, for RL training; both outputs
differentiable) are four more, built the same way::

    gpuce::token_logprobs(Tensor logits, Tensor target, float temperature, float softcap,
        SymInt ignore_index, bool return_entropy) -> (Tensor logp, Tensor entropy)
    gpuce::token_logprobs_backward(Tensor? grad_logp, Tensor? grad_entropy, Tensor logits,
        Tensor target, float temperature, float softcap, SymInt ignore_index) -> Tensor
    gpuce::linear_token_logprobs(Tensor x, Tensor w, Tensor target, Tensor? bias,
        float temperature, float softcap, SymInt ignore_index, bool return_entropy,
        SymInt? chunk_size) -> (Tensor logp, Tensor entropy)
    gpuce::linear_token_logprobs_backward(Tensor? grad_logp, Tensor? grad_entropy, Tensor x,
        Tensor w, Tensor target, Tensor? bias, float temperature, float softcap,
        SymInt ignore_index, SymInt? chunk_size, bool x_grad) -> (Tensor d_x, Tensor d_w,
        Tensor d_b)

``gpuce.torch.distillation_loss`` and ``gpuce.torch.linear_distillation_loss`` (a student
against a teacher's softmax; the teacher a constant) are four more::

    gpuce::distillation_loss(Tensor student, Tensor teacher, Tensor? teacher_indices,
        Tensor? target, float beta, float temperature, SymInt ignore_index, str reduction,
        float softcap, bool need_grad) -> (Tensor loss, Tensor grad)
    gpuce::distillation_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher,
        Tensor? teacher_indices, Tensor? target, float beta, float temperature,
        SymInt ignore_index, str reduction, float softcap) -> Tensor
    gpuce::linear_distillation_loss(Tensor xs, Tensor ws, Tensor xt, Tensor wt, Tensor? target,
        Tensor? bs, Tensor? bt, float beta, float temperature, SymInt ignore_index,
        str reduction, float softcap, SymInt? chunk_size, bool x_grad, bool need_grad)
        -> (Tensor loss, Tensor d_x, Tensor d_w, Tensor d_b)
    gpuce::linear_distillation_loss_backward(Tensor grad_loss, Tensor xs, Tensor ws,
        Tensor xt, Tensor wt, Tensor? target, Tensor? bs, Tensor? bt, float beta,
        float temperature, SymInt ignore_index, str reduction, float softcap,
        SymInt? chunk_size, bool x_grad) -> (Tensor d_x, Tensor d_w, Tensor d_b)

The LLM-head options (softcap, 0. for none; return_stats; check_labels) come last, with
defaults.  The statistics (z-loss part, token accuracy, per-row lse: gpuce.SceStats) are
outputs of the forward operators, empty tensors unless return_stats.  z_loss and accuracy
carry no gradient (marked non-differentiable); lse is differentiable, ∂lse_i/∂f_ij = q_ij
(through the cap), formed in backward from the logits (kept for it with return_stats; the
linear operator forms each chunk's logits again) and added to the loss's gradient, so that
``loss + z * (lse ** 2).mean()`` trains.

The forward operators take the class axis last.  With a ``True`` grad flag they compute the
gradient of the returned loss in the same fused pass and return it beside the loss (an empty
tensor stands for "not computed"); the autograd formula (``register_autograd``) keeps only
that gradient and, in backward, scales it by the incoming gradient.  The ``*_backward``
operators run where more is needed, and only then are the inputs kept for backward:
``reduction="none"`` in the linear version (gpuce's chunked pass again, each row scaled by
its incoming gradient), a forward pass that computed no gradient, and gradients for a
probability target or the class weight (from log q, gpuce.log_softmax of the logits, formed
again).  They are opaque to the compiler too.  Gradients returned under
``create_graph=True`` raise ``RuntimeError`` when differentiated again: gpuce has no double
backward.

Each operator is generated from one spec entry (``_spec.OpSpec``: its name and its
implementation, fake, setup-context and backward functions): the custom operator with its
fake and autograd registrations, and an eager twin, a ``torch.autograd.Function`` running the
same functions without torch's dispatcher.  Calls that nothing traces (not compiling, no fake
tensors, functorch transforms or torch modes, plain tensors and arguments) take the twin, whose
results, errors and autograd behaviour are the custom operator's; every other call goes
through the custom operator.

The package, by concept: ``_bridge`` (dtypes, tensors to arrays and back, device and
stream, autocast), ``_autograd`` (what the operators share: statistics outputs, options,
incoming-gradient scaling, the first-order guard), ``_spec`` (operators from spec entries,
the routing between eager twin and custom operator), ``_ce``, ``_lce``, ``_tokens`` and ``_distill`` (each loss's
implementation, fake and autograd functions, its spec entries and public function),
``_modules`` (the nn.Module forms); the Hugging Face patch is :mod:`gpuce._hf`.

torch is an optional dependency: import this package only where torch is installed.
"""

from __future__ import annotations

from ._bridge import REDUCTIONS, SUPPORTED_DTYPES, _to_array, _to_tensor  # noqa: F401
from ._ce import cross_entropy
from ._lce import linear_cross_entropy
from ._modules import CrossEntropyLoss, LinearCrossEntropyLoss
from ._distill import distillation_loss, linear_distillation_loss
from ._tokens import linear_token_logprobs, token_logprobs

__all__ = ["cross_entropy", "linear_cross_entropy", "token_logprobs", "linear_token_logprobs",
           "distillation_loss", "linear_distillation_loss",
           "CrossEntropyLoss",
           "LinearCrossEntropyLoss", "patch", "unpatch", "is_patched", "SUPPORTED_DTYPES",
           "REDUCTIONS"]


def patch(model, *, z_loss=0.0, chunk_size=None, return_logits="auto"):
    """Make a Hugging Face transformers causal LM (Llama, Mistral, Qwen2, Qwen3, GPT-2, Gemma,
    Gemma 2) compute its training loss with :func:`linear_cross_entropy` straight from the
    hidden states and ``lm_head``, never forming the logits.  The instance is patched in
    place and returned.

    A call with ``labels`` shifts them as transformers does (padded with -100, the hidden
    states not copied; a ``shift_labels=`` keyword is used as given), ignores -100, and
    divides the summed loss by ``num_items_in_batch`` when given (Trainer's gradient
    accumulation), else takes the mean over the tokens that are not ignored.  Gemma 2's
    ``final_logit_softcapping`` is gpuce's ``softcap``.  ``return_logits``: "auto" returns no
    logits in training mode and the model's own in eval mode; True / False decide instead
    (also as a keyword of the call).  ``z_loss`` and ``chunk_size`` are passed to
    :func:`linear_cross_entropy`.  Calls without labels run the model's forward untouched.
    Other architectures raise ValueError.  Needs ``transformers``."""
    from .. import _hf

    return _hf.patch(model, linear_cross_entropy, z_loss=z_loss, chunk_size=chunk_size,
                     return_logits=return_logits)


def unpatch(model):
    """Undo :func:`patch` on this model instance.  Returns the model."""
    from .. import _hf

    return _hf.unpatch(model)


def is_patched(model):
    """Whether :func:`patch` is in effect on this model instance."""
    from .. import _hf

    return _hf.is_patched(model)
