"""The GPU backend: minimoe's layers as CUDA kernels, launched through CuPy.

    model = minimoe.load(path, backend="cupy")    # weights to the GPU once, bf16 kept as bf16
    logits = model.forward(ids)                   # a CuPy array; minimoe.to_numpy(logits) for NumPy

``minimoe/kernels/*.cu``   the kernels, each beside the NumPy function it replaces (named in its header)
:mod:`.launch`             grid/block sizes and the MoE dispatch bookkeeping in NumPy (no CuPy; tested on CPU)
:mod:`.kernels`            CuPy wrappers: compile the .cu files (NVRTC), launch them
:mod:`.blocks`             the model's blocks on the GPU and :func:`~minimoe.gpu.blocks.build`
:mod:`.decode`             decode steps on fixed buffers, replayed as one CUDA graph per token

Only :mod:`.launch` may be imported without CuPy; ``python -m minimoe.gpu_check`` holds
every kernel against its NumPy function on a GPU machine.  See docs/gpu.md.
"""
