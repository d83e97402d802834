"""gpuce's CuPy host code: everything between the backend layer and the CUDA sources.

=============  ================================================================================
sce            the CuPy backend of softmax cross-entropy: the fused path (two launches, one
               read-back) or the portable path (ElementwiseKernel / ReductionKernel)
fused          the fused path: the variant list (template instantiations), the planner,
               explain, the launch
kernels        every CuPy kernel as a KernelSpec (data) + memoized, lazily built factories
source         finds the CUDA sources (``kernels/`` in the source tree, ``gpuce/kernels`` in
               the wheel) and pastes helpers into preambles
nvrtc          offline NVRTC compile of every kernel spec and ``.cu`` file, ptxas report parsing
checks         the spill rule of every compiled kernel (``gpuce check-kernels`` and the tests)
=============  ================================================================================

Nothing here imports CuPy at import time: each module imports it inside the functions that
launch or compile, so ``import gpuce`` works with CuPy installed and no GPU, and with no CuPy
at all.  This package imports none of its modules itself.
"""
