"""The bridge between torch and gpuce's arrays: supported dtypes and checks, tensors to NumPy /
CuPy arrays and back without copies (DLPack; bfloat16 through an int16 view where needed),
the device and stream a call runs on, autocast's dtype rule."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .._backend import is_cupy_array
from .._validation import REDUCTIONS, bfloat16_dtype


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# the dtypes computed in float32 (their loss comes back in their own dtype, as torch's)
_HALF = (torch.float16, torch.bfloat16)


def _check_dtype(t, name):
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"gpuce.torch: {name} has dtype {t.dtype}, which gpuce does not support; supported: "
            "torch.float16, torch.bfloat16, torch.float32, torch.float64 (cast with .float() "
            "first)")
    if t.dtype == torch.bfloat16:
        _bf16()


def _bf16():
    """NumPy's bfloat16 dtype (ml_dtypes'), or TypeError naming the package to install."""
    dt = bfloat16_dtype()
    if dt is None:
        raise TypeError("gpuce.torch: torch.bfloat16 tensors need the ml_dtypes package "
                        "(NumPy's and CuPy's bfloat16); install it: pip install ml_dtypes")
    return dt


def _cupy_bf16(t):
    """A CUDA bfloat16 tensor as a CuPy bfloat16 array on the same memory: through DLPack
    where this CuPy takes bfloat16 there, else its int16 view reinterpreted (same bits)."""
    import cupy

    try:
        return cupy.from_dlpack(t)
    except (TypeError, ValueError, BufferError, RuntimeError):
        return cupy.from_dlpack(t.view(torch.int16)).view(_bf16())


def _check_device(*tensors):
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"gpuce.torch: all tensors must be on one device, got {sorted(map(str, devs))}")
    for d in devs:
        if d.type not in ("cpu", "cuda"):
            raise TypeError(f"gpuce.torch supports CPU and CUDA tensors, got device {d}")


def _to_array(t):
    """The tensor's data as a CuPy (CUDA) or NumPy (CPU) array, sharing memory."""
    if t is None:
        return None
    t = t.detach()
    if t.is_cuda:
        if t.dtype == torch.bfloat16:
            return _cupy_bf16(t)
        import cupy

        return cupy.from_dlpack(t)
    if t.dtype == torch.bfloat16:
        # NumPy has no bfloat16 of its own (np.from_dlpack and Tensor.numpy refuse it): the
        # same-size int16 view's array, reinterpreted as ml_dtypes.bfloat16 (no copy)
        return t.resolve_neg().view(torch.int16).numpy().view(_bf16())
    return t.resolve_conj().resolve_neg().numpy()


def _to_tensor(a, dtype=None):
    """An array returned by gpuce as a C-contiguous tensor on its device (no copy where the
    array already is one): the fake implementations promise contiguous outputs."""
    if is_cupy_array(a):
        if a.dtype.name == "bfloat16":
            try:
                t = torch.from_dlpack(a)
            except (TypeError, ValueError, BufferError, RuntimeError):
                t = torch.from_dlpack(a.view("int16")).view(torch.bfloat16)
        else:
            t = torch.from_dlpack(a)
    else:
        a = np.asarray(a)
        a = a if a.flags.c_contiguous else a.copy()
        if a.dtype.name == "bfloat16":  # torch.from_numpy refuses ml_dtypes: the int16 view
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(a)
    t = t.contiguous()
    return t if dtype is None else t.to(dtype)


def _none(like):
    """The empty tensor that stands for "not computed" in an operator's outputs."""
    return like.new_empty((0,))


def _acc_of(dtype):
    """The accumulation dtype of an input dtype (float32 for the 16-bit ones)."""
    return torch.float32 if dtype in _HALF else dtype


def _autocast_dtype(t):
    """The dtype torch.autocast casts to on t's device, or None where autocast is off there
    (or t is not on a CPU or CUDA device)."""
    dev = t.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _autocast_to(t, dtype):
    """A floating tensor cast as autocast casts it (float64 kept, as torch's autocast keeps it),
    anything else (None, integer class indices) as it is."""
    if t is None or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
        return t
    return t.to(dtype)


@contextlib.contextmanager
def _device_of(t):
    """For a CUDA tensor: CuPy on its device and on torch's current stream there, so that
    gpuce's kernels are ordered with the torch work around them (no extra sync)."""
    if not t.is_cuda:
        yield
        return
    import cupy

    with cupy.cuda.Device(t.device.index):
        ptr = torch.cuda.current_stream(t.device).cuda_stream
        if ptr == 0:  # torch's default stream is the legacy null stream, CuPy's default too
            yield
            return
        with cupy.cuda.ExternalStream(ptr):
            yield
