"""Hugging Face transformers: a causal LM's training loss through gpuce's linear cross-entropy.

``patch(model)`` replaces the forward of one model instance (not its class).  When the call
has ``labels``, the patched forward runs the model's own forward with ``labels=None`` while
``lm_head`` only records its input (the final hidden states, after every model-specific
step before the head) and returns an empty (..., 0) placeholder, so the N x V logits are
never formed.  The loss is then :func:`gpuce.torch.linear_cross_entropy` of those hidden
states, ``lm_head``'s weight (and bias) and the shifted labels, with the model's final logit
soft-capping where its config has one (Gemma 2).  Without labels the model's own forward
runs untouched (generation, inference).

Only architectures whose head is a plain ``lm_head`` followed by nothing but an optional
soft-cap are accepted (:data:`SUPPORTED`); any other model is refused with a ValueError,
never given a silently different loss.
"""

import contextlib
import dataclasses
import inspect

import torch

__all__ = ["patch", "unpatch", "is_patched", "SUPPORTED"]

#: model_type -> the config attribute holding the final logit soft-cap (None: no cap).  Each
#: of these computes ``logits = lm_head(hidden_states)`` and, at most, caps them.
SUPPORTED = {
    "llama": None,
    "mistral": None,
    "qwen2": None,
    "qwen3": None,
    "gpt2": None,
    "gemma": None,
    "gemma2": "final_logit_softcapping",
}

_ATTR = "_gpuce_lce_options"


def patch(model, loss_fn, *, z_loss=0.0, chunk_size=None, return_logits="auto"):
    """Make a transformers causal LM compute its training loss with gpuce's chunked linear
    cross-entropy, straight from the final hidden states and ``lm_head``: the N x V logits
    are never materialised.

    Parameters
    ----------
    model : transformers ``*ForCausalLM`` (``model.config.model_type`` in :data:`SUPPORTED`:
        llama, mistral, qwen2, qwen3, gpt2, gemma, gemma2)
        Patched in place, this instance only; patching again replaces the options.
    loss_fn : callable
        :func:`gpuce.torch.linear_cross_entropy` (passed in by ``gpuce.torch.patch``, so that
        this module does not import gpuce.torch back).
    z_loss : float
        gpuce's z-loss coefficient (0: the model's own loss exactly).
    chunk_size : int, optional
        Rows per chunk of :func:`gpuce.torch.linear_cross_entropy` (None: from free memory).
    return_logits : "auto", True or False
        Whether a call with ``labels`` also returns the logits.  "auto" (default): not in
        training mode (``model.training``; ``outputs.logits`` is None), yes in eval mode
        (``Trainer.evaluate`` and metrics need them).  A call can override it with the
        keyword ``return_logits=``.  When returned, the logits are the model's own
        (``lm_head`` and its cap); the loss still comes from gpuce.

    Returns
    -------
    model

    Notes
    -----
    What the patched forward does with ``labels`` (as transformers' ``ForCausalLMLoss``):

    * the labels are shifted left by one position and padded with -100 (the hidden states are
      not sliced or copied); a ``shift_labels=`` keyword is used as given instead;
    * ignore_index is -100;
    * with ``num_items_in_batch`` (what ``Trainer`` passes under gradient accumulation) the
      loss is the sum over the tokens divided by it, otherwise the mean over the tokens that
      are not ignored;
    * the loss is float32 for 16-bit models (gpuce forms each chunk's logits in float32, as
      transformers upcasts its logits before the loss).

    * ``ignore_index=`` passed to the forward is honoured, as transformers' loss does;
    * with ``return_dict=False`` the tuple keeps the logits' place: ``out[1]`` is None when
      the logits are not returned, and the cache and the rest follow as unpatched.

    Without labels the model's own forward runs (generation is unchanged).  The patch sets an
    attribute on the instance: ``copy.deepcopy`` and pickling keep it, ``unpatch`` removes it.

    Limits (each a clear error at the call, never a silently different loss): the head must
    stay a plain floating-point ``nn.Linear`` without forward hooks (a LoRA/PEFT adapter or a
    quantised layer on ``lm_head``, and accelerate's offload or multi-device ``device_map``
    hooks on it, are refused); ``model.loss_function`` must not be replaced; the patch does not
    follow ``torch.nn.DataParallel``'s replicas (use DistributedDataParallel).  Under
    ``torch.compile`` the patched forward runs eagerly (the head's forward is swapped during
    the call): compiling the model gains nothing where it has labels.  In eval mode with
    ``return_logits="auto"`` the logits are formed even when the caller only wants the loss
    (``Trainer``'s ``prediction_loss_only``): pass ``return_logits=False`` to skip them.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"gpuce.torch.patch expects a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"gpuce.torch.patch supports the causal LMs of model_type "
                         f"{sorted(SUPPORTED)}; got {type(model).__name__} with model_type "
                         f"{model_type!r}")
    head = model.get_output_embeddings()
    name = type(model).__name__
    if not isinstance(head, torch.nn.Linear) or not ("ForCausalLM" in name
                                                     or "LMHeadModel" in name):
        raise ValueError(f"gpuce.torch.patch needs a causal LM with an nn.Linear lm_head "
                         f"(for example LlamaForCausalLM), got {type(model).__name__}")
    if not (isinstance(return_logits, bool) or return_logits == "auto"):
        raise ValueError(f"return_logits must be 'auto', True or False, got {return_logits!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    z_loss = float(z_loss)
    if not z_loss >= 0.0 or z_loss == float("inf"):
        raise ValueError(f"z_loss must be finite and >= 0, got {z_loss}")
    cap_attr = SUPPORTED[model_type]
    options = dict(z_loss=z_loss, chunk_size=chunk_size, return_logits=return_logits,
                   cap_attr=cap_attr)
    # a plain attribute (not a closure over the model): deepcopy and pickle follow it
    object.__setattr__(model, _ATTR, options)
    object.__setattr__(model, "forward", _PatchedForward(model, loss_fn))
    if not any(h is _check_replica for h in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_check_replica)
    return model


def unpatch(model):
    """Undo :func:`patch` (the class's forward again).  Returns the model."""
    model.__dict__.pop("forward", None)
    model.__dict__.pop(_ATTR, None)
    for key in [k for k, h in model._forward_pre_hooks.items() if h is _check_replica]:
        del model._forward_pre_hooks[key]
    return model


def is_patched(model):
    """Whether :func:`patch` is in effect on this model instance."""
    return isinstance(model.__dict__.get("forward"), _PatchedForward)


class _PatchedForward:
    """The instance's forward: the class's forward with the loss from gpuce (see patch)."""

    def __init__(self, model, loss_fn):
        self.model = model
        self.loss_fn = loss_fn

    @property
    def __signature__(self):
        # what Trainer inspects (the columns it keeps, whether it passes num_items_in_batch):
        # the class's forward signature, plus return_logits
        sig = inspect.signature(type(self.model).forward)
        params = list(sig.parameters.values())[1:]
        extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=None)
        var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
        params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
        return sig.replace(parameters=params + [extra] + var_kw)

    def __call__(self, *args, return_logits=None, **kwargs):
        return _forward(self.model, self.loss_fn, args, kwargs, return_logits)


def _check_replica(module, args):
    """A forward pre-hook: the patched forward belongs to one instance.  A copy that shares
    its ``__dict__`` (nn.DataParallel's replicas) would run the original's forward."""
    fwd = module.__dict__.get("forward")
    if isinstance(fwd, _PatchedForward) and fwd.model is not module:
        raise RuntimeError(
            f"gpuce.torch.patch: this {type(module).__name__} is a replica of a patched model "
            f"(torch.nn.DataParallel); the patch does not follow replicas: use "
            f"DistributedDataParallel (one process a device), or patch each copy")


def _check_head(model, head):
    """Refuse, at every call, what the loss from ``head.weight`` and ``head.bias`` would
    silently get wrong: a head that is not exactly a Linear (LoRA/PEFT, quantised layers), hooks
    that change its input or output, accelerate's device hooks, a replaced loss function."""
    name = type(model).__name__
    if type(head).forward is not torch.nn.Linear.forward or not torch.is_floating_point(
            head.weight):
        raise ValueError(f"gpuce.torch.patch: {name}'s lm_head is now a "
                         f"{type(head).__name__}, not a plain floating-point nn.Linear (an "
                         f"adapter or a quantised layer?): its output is not input @ weight.T "
                         f"+ bias; unpatch the model, or apply the adapter elsewhere")
    if "forward" in head.__dict__ or head._forward_hooks or head._forward_pre_hooks:
        raise ValueError(f"gpuce.torch.patch: {name}'s lm_head has forward hooks or a "
                         f"wrapped forward (accelerate's offload / device_map hooks?); the loss "
                         f"would bypass them: keep the head on one device without hooks, or "
                         f"unpatch the model")
    if "_loss_function" in model.__dict__:
        raise ValueError(f"gpuce.torch.patch: {name}.loss_function was replaced; the patched "
                         f"forward computes the causal-LM loss itself and would ignore it: "
                         f"unpatch the model to use your loss function")


@torch.compiler.disable
def _forward(model, loss_fn, args, kwargs, return_logits):
    # torch.compile: run eagerly (the head's forward is swapped during the call, which a
    # traced graph cannot follow); the layers inside are not compiled either
    cls_forward = type(model).forward
    bound = inspect.signature(cls_forward).bind(model, *args, **kwargs)
    arguments = bound.arguments
    labels = arguments.get("labels")
    if labels is None:
        return cls_forward(*bound.args, **bound.kwargs)
    options = model.__dict__[_ATTR]
    if return_logits is None:
        return_logits = options["return_logits"]
    if return_logits == "auto":
        return_logits = not model.training
    elif not isinstance(return_logits, bool):
        raise ValueError(f"return_logits must be 'auto', True, False or None, got "
                         f"{return_logits!r}")
    var_kw = next((n for n, p in inspect.signature(cls_forward).parameters.items()
                   if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    extra = arguments.get(var_kw, {}) if var_kw else {}
    shift_labels = extra.pop("shift_labels", None)
    ignore_index = extra.pop("ignore_index", -100)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
    num_items = extra.get("num_items_in_batch")
    want_tuple = _wants_tuple(model, arguments, extra)
    arguments["labels"] = None
    if "return_dict" in arguments:
        arguments["return_dict"] = True
    else:
        extra["return_dict"] = True
    if var_kw:
        arguments[var_kw] = extra

    head = model.get_output_embeddings()
    _check_head(model, head)
    captured = []

    def capture(hidden):
        captured.append(hidden)
        if return_logits:
            return type(head).forward(head, hidden)
        return hidden.new_empty(hidden.shape[:-1] + (0,))

    head.forward = capture  # _check_head: the head has no forward of its own to keep
    try:
        out = cls_forward(*bound.args, **bound.kwargs)
    finally:
        del head.forward
    if len(captured) != 1:
        raise RuntimeError(f"gpuce.torch.patch: {type(model).__name__}'s forward called lm_head "
                           f"{len(captured)} times (expected once)")
    if isinstance(out, tuple):
        raise RuntimeError(f"gpuce.torch.patch: {type(model).__name__}'s forward returned a "
                           f"tuple with return_dict=True")
    loss = _loss(model, loss_fn, captured[0], labels, shift_labels, num_items, ignore_index,
                 options)
    fields = dict(out.items())
    fields["loss"] = loss
    fields["logits"] = fields.get("logits") if return_logits else None
    if want_tuple:
        # the model's tuple, with logits kept in their place (None when not returned) so that
        # out[1] is the logits slot and out[2] the cache, as unpatched
        return tuple(fields.get(f.name) for f in dataclasses.fields(out)
                     if fields.get(f.name) is not None or f.name == "logits")
    return type(out)(**fields)


def _wants_tuple(model, arguments, extra):
    """transformers' rule (``can_return_tuple``): return_dict if given, else the config's."""
    rd = arguments.get("return_dict", extra.get("return_dict"))
    if rd is None:
        rd = getattr(model.config, "return_dict", True)
    return rd is False


def _loss(model, loss_fn, hidden, labels, shift_labels, num_items, ignore, options):
    """The causal-LM loss of transformers' ForCausalLMLoss from the hidden states."""
    if shift_labels is None:
        # position t predicts labels[t + 1]; the last position has no next token: padded with
        # ignore_index (the labels are small; the hidden states are left as they are)
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:]
    head = model.get_output_embeddings()
    w, b = head.weight, head.bias
    if hidden.device != w.device:
        hidden = hidden.to(w.device)
    shift_labels = shift_labels.to(w.device)
    if hidden.shape[:-1] != shift_labels.shape:
        raise ValueError(f"gpuce.torch.patch: the labels {tuple(shift_labels.shape)} do not match "
                         f"the positions whose logits the model forms "
                         f"{tuple(hidden.shape[:-1])} (logits_to_keep with labels?)")
    cap_attr = options["cap_attr"]
    softcap = getattr(model.config, cap_attr, None) if cap_attr else None
    x = hidden.reshape(-1, hidden.shape[-1])
    y = shift_labels.reshape(-1)
    reduction = "mean" if num_items is None else "sum"
    dev = x.device.type
    if x.dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(dev):
        # a float32 loss, as transformers' (it upcasts the logits): gpuce.torch's autocast
        # rule gives a float32 loss from 16-bit inputs (they are already in x's dtype)
        ctx = torch.autocast(dev, dtype=x.dtype)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        loss = loss_fn(x, w, y, linear_bias=b, reduction=reduction, ignore_index=ignore,
                       z_loss=options["z_loss"], chunk_size=options["chunk_size"],
                       softcap=softcap)
    if num_items is not None:
        if torch.is_tensor(num_items):
            num_items = num_items.to(loss.device)
        loss = loss / num_items
    return loss
