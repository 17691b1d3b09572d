"""Run the real CUDA kernels on a CPU: each .cu file compiled as C++ with a small CUDA shim.

:mod:`gpu_emulation` replaces each kernel by NumPy written from its signature, which tests
the host code but not the kernel bodies.  This goes one step further: the ``.cu`` source
itself is compiled with ``g++`` against :data:`SHIM`, which gives every CUDA thread of a
block its own ``std::thread`` (``threadIdx`` and friends thread-local), ``__syncthreads``
a barrier over the block, and the warp shuffles a barrier-guarded exchange among the 32
threads of a warp.  Blocks run one after another, so ``__shared__`` arrays can be plain
statics.  It is slow (a thread per CUDA thread) and knows nothing of timing, memory
coalescing or races the hardware would expose, but indexing, reductions, the online
softmax, the tiling and the dispatch run exactly as written -- on tiny shapes, against NumPy.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import numpy as np

from minimoe.gpu import launch

import gpu_emulation

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static  // blocks run one at a time: a static is shared by the block's threads

struct dim3 { unsigned x = 1, y = 1, z = 1; };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int min(int a, int b) { return a < b ? a : b; }

namespace cpu {
struct Warp { std::unique_ptr<std::barrier<>> barrier; uint32_t slots[32]; };
inline thread_local Warp* warp = nullptr;
inline thread_local std::barrier<>* block_barrier = nullptr;
alignas(16) inline unsigned char dynamic_shared[1 << 20];

template <class Kernel> void run_grid(dim3 grid, dim3 block, Kernel kernel) {
    const unsigned n = block.x * block.y * block.z;
    for (unsigned z = 0; z < grid.z; ++z) for (unsigned y = 0; y < grid.y; ++y) for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> block_sync(n);
        std::vector<Warp> warps((n + 31) / 32);
        for (unsigned w = 0; w < warps.size(); ++w) warps[w].barrier = std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w));
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < n; ++t) threads.emplace_back([&, t] {
            threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = dim3{x, y, z}; blockDim = block; gridDim = grid;
            warp = &warps[t / 32]; block_barrier = &block_sync;
            kernel();
            warp->barrier->arrive_and_drop();  // a thread that has returned no longer takes part
            block_sync.arrive_and_drop();
        });
        for (auto& thread : threads) thread.join();
    }
}
}  // namespace cpu

inline void __syncthreads() { cpu::block_barrier->arrive_and_wait(); }

template <typename T> T __shfl_up_sync(unsigned, T value, int offset) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    const unsigned lane = threadIdx.x % 32;
    std::memcpy(&cpu::warp->slots[lane], &value, 4);
    cpu::warp->barrier->arrive_and_wait();
    T other = value;  // lanes below `offset` get their own value back
    if (lane >= (unsigned)offset) std::memcpy(&other, &cpu::warp->slots[lane - offset], 4);
    cpu::warp->barrier->arrive_and_wait();
    return other;
}

template <typename T> T __shfl_xor_sync(unsigned, T value, int offset) {
    static_assert(sizeof(T) == 4, "32-bit shuffles only");
    const unsigned lane = threadIdx.x % 32;
    std::memcpy(&cpu::warp->slots[lane], &value, 4);
    cpu::warp->barrier->arrive_and_wait();
    T other; std::memcpy(&other, &cpu::warp->slots[lane ^ offset], 4);
    cpu::warp->barrier->arrive_and_wait();  // nobody overwrites a slot before every lane has read
    return other;
}
"""

C_TYPES = {"pointer": ctypes.c_void_p, "int": ctypes.c_int, "long": ctypes.c_long, "float": ctypes.c_float}


def cpu_source(file_name: str) -> str:
    """The .cu file as C++ for the shim, plus a ``launch_<kernel>`` C function per kernel."""
    text = launch.module_source(file_name)  # what CuPy compiles: common.cuh inlined
    text = re.sub(r"extern __shared__ float (\w+)\[\];", r"float* \1 = (float*)cpu::dynamic_shared;", text)
    launchers = []
    for name in re.findall(r'extern "C" __global__ void (\w+)\(', text):
        params = gpu_emulation.kernel_parameter_text(file_name, name)
        names = ", ".join(p.replace("*", " ").split()[-1] for p in params)
        launchers.append(
            f'extern "C" void launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, '
            f'unsigned bz, {", ".join(params)}) {{\n'
            f"    cpu::run_grid(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}}, [=] {{ {name}({names}); }});\n}}\n")
    return "#include \"shim.h\"\n" + text + "\n" + "\n".join(launchers)


@cache
def library(file_name: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The .cu file compiled for the CPU with ``defines`` (``"NAME=value"``), cached by source in a temporary folder."""
    source = "".join(f"#define {define.replace('=', ' ', 1)}\n" for define in defines) + cpu_source(file_name)
    folder = Path(tempfile.gettempdir()) / f"minimoe-cuda-on-cpu-{hashlib.sha1((SHIM + source).encode()).hexdigest()[:12]}"
    folder.mkdir(exist_ok=True)
    target = folder / f"{Path(file_name).stem}.so"
    if not target.exists():
        (folder / "shim.h").write_text(SHIM)
        (folder / f"{Path(file_name).stem}.cpp").write_text(source)
        command = [shutil.which("g++") or "g++", "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w",
                   f"-I{folder}", str(folder / f"{Path(file_name).stem}.cpp"),
                   "-o", str(target)]
        subprocess.run(command, check=True, capture_output=True, text=True)
    return ctypes.CDLL(str(target))


@cache
def unavailable_reason() -> str | None:
    """Why the kernels cannot be compiled for the CPU here (no g++, or one without C++20 <barrier>), or None."""
    compiler = shutil.which("g++")
    if compiler is None:
        return "g++ is not on PATH"
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "shim.cpp").write_text(SHIM + "\nint main() { return 0; }\n")
        result = subprocess.run([compiler, "-std=c++20", "-pthread", "-fsyntax-only", str(Path(folder) / "shim.cpp")],
                                capture_output=True, text=True)
    return None if result.returncode == 0 else f"g++ cannot compile the CUDA shim (C++20 <barrier>): {result.stderr[:200]}"


def cpu_kernel(file_name: str, name: str, defines: tuple[str, ...] = ()):
    """A stand-in for ``kernels.compiled(file_name, name, defines)`` that runs the kernel's own code on the CPU."""
    parameters = gpu_emulation.kernel_parameters(file_name, name)
    function = getattr(library(file_name, defines), f"launch_{name}")
    function.argtypes = [ctypes.c_uint] * 6 + [C_TYPES[c_type] for c_type, _ in parameters]
    function.restype = None

    def launch_(grid, block, args, shared_mem=0):
        assert shared_mem <= 1 << 20
        gpu_emulation.check_arguments(file_name, name, parameters, args)
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        values = [(a.ctypes.data if isinstance(a, np.ndarray) else int(a)) if c_type == "pointer" else a.item()
                  for a, (c_type, _) in zip(args, parameters)]
        function(*grid, *block, *values)

    return launch_


def install(monkeypatch) -> None:
    """Make ``backend="cupy"`` run the real kernels on the CPU, for one test."""
    gpu_emulation.install(monkeypatch)
    import minimoe.gpu.kernels as kernels

    monkeypatch.setattr(kernels, "compiled", cpu_kernel)
