"""Where the CUDA sources live and how they are turned into kernel preambles.

The CUDA code is kept once, in the top-level ``kernels/`` folder of the source
tree; the wheel ships it as ``gpuce/kernels`` (see ``pyproject.toml``).  This
module finds that folder and reads files from it.  It never imports CuPy.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

# the gpuce package folder (this file is gpuce/_cuda/source.py)
_PKG_DIR = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def kernel_dir() -> Path:
    """Return the folder holding gpuce's ``*.cuh`` / ``*.cu`` files.

    An installed wheel has them in ``gpuce/kernels``; a source checkout (or an
    editable install) in ``kernels/`` beside the package.
    """
    for candidate in (_PKG_DIR / "kernels", _PKG_DIR.parent / "kernels"):
        if (candidate / "gpuce_rowstat.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        "gpuce's CUDA sources were not found: looked in "
        f"{_PKG_DIR / 'kernels'} and {_PKG_DIR.parent / 'kernels'}"
    )


@functools.lru_cache(maxsize=None)
def read_source(name: str) -> str:
    """Text of one file in :func:`kernel_dir`."""
    return (kernel_dir() / name).read_text()


def preamble(*names: str) -> str:
    """Join the named helper files into one preamble.

    The text is pasted rather than ``#include``-d so that CuPy's on-disk kernel
    cache, keyed by the source text, notices any change to a helper.
    """
    return "\n".join(f"// ---- {n} ----\n{read_source(n)}" for n in names)


_LOCAL_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$', re.M)


def expand(name: str) -> str:
    """Text of ``name`` with ``#include "x.cuh"`` of gpuce's own files pasted in (once each).

    Raw modules are compiled from this text, so CuPy's cache key sees every helper.
    """
    seen = set()

    def paste(match):
        inc = match.group(1)
        if inc in seen:
            return f"// {inc} (already included)"
        seen.add(inc)
        return f"// ---- {inc} ----\n" + _LOCAL_INCLUDE.sub(paste, read_source(inc))

    return _LOCAL_INCLUDE.sub(paste, read_source(name))


def all_sources() -> list[Path]:
    """Every CUDA file the library ships (for the offline compile test)."""
    d = kernel_dir()
    return sorted(list(d.glob("*.cuh")) + list(d.glob("*.cu")))
