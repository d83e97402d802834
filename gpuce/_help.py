"""What the command line says to a person: --help text from docstrings, and why there is no
GPU to run on.  Shared by ``gpuce`` (gpuce.cli) and ``gpuce bench`` (gpuce.benchmark)."""

from __future__ import annotations

import re


def plain_text(doc: str) -> str:
    """A docstring as --help shows it: reST roles and literals (``x``, :func:`x`) as plain x."""
    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")


def why_no_gpu():
    """None when CuPy imports and sees a GPU; else why not, in words."""
    try:
        import cupy
    except ImportError:
        return ("CuPy is not installed (pip install cupy-cuda13x, or cupy-cuda12x for CUDA 12: "
                "gpuce's cuda13 / cuda12 extras)")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or the driver finds no device
        return f"CuPy is installed but sees no GPU ({type(e).__name__}: {e})"
    return None if n > 0 else "CuPy is installed but sees no GPU (0 devices)"
