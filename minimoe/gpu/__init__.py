"""The GPU backend: minimoe's operations as CUDA kernels, launched through CuPy.

    model = minimoe.load(path, backend="cupy")    # weights to the GPU once, bf16 kept as bf16
    logits = model.forward(ids)                   # a CuPy array; minimoe.to_numpy(logits) for NumPy

``minimoe/gpu/cuda/*.cu``  the kernels, each beside the NumPy function it replaces (named in its header)
:mod:`.launch`             grid/block sizes and the MoE dispatch bookkeeping in NumPy (no CuPy; tested on CPU)
:mod:`.kernels`            CuPy wrappers: compile the .cu files (NVRTC), launch them
:mod:`.ops`                the table of operations the model runs on the GPU, each a kernel (or a few)
:mod:`.decode`             decode steps on fixed buffers, replayed as one CUDA graph per token
:mod:`.profile`            each kernel of a forward pass timed, its bytes and FLOPs counted

Only :mod:`.launch` may be imported without CuPy; ``python -m minimoe.gpu_check``
(:mod:`minimoe.tools.gpu_check`) holds every kernel to NumPy on a GPU machine.  See docs/gpu.md.
"""
