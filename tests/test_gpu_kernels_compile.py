"""Every CUDA kernel compiles -- with NVRTC and CuPy's options, as CuPy compiles it at run time, and with
nvcc -- for the GPUs we target; the wrappers launch kernels that exist; common.cuh is part of what CuPy
compiles (so its binary cache sees edits to it)."""

from __future__ import annotations

import ctypes
import ctypes.util
import itertools
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

from minimoe.gpu import launch

import gpu_emulation

SOURCES = launch.kernel_sources()
ARCHITECTURES = ("sm_80", "sm_90")  # A100, H100/H200
# What CuPy's RawModule adds to minimoe's options (cupy/cuda/compiler.py, _compile_with_cache_cuda and
# compile_using_nvrtc): flush-to-zero, then the target.  Its -I options (CuPy's and the toolkit's
# include folders) are left out: the kernels include nothing.
CUPY_OPTIONS = ("-ftz=true",)


def declared_kernels(source: str) -> set[str]:
    return set(re.findall(r'extern "C" __global__ void (\w+)\(', source))


def test_the_kernel_folder_has_the_kernels():
    assert {p.name for p in SOURCES} == {"attention.cu", "matmul.cu", "moe.cu", "norm.cu", "rope.cu"}


# --- what CuPy compiles: common.cuh inlined ----------------------------------------------------------------

@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_the_source_cupy_compiles_inlines_common_cuh(source):
    text = launch.module_source(source.name)
    assert "#include" not in text
    assert (launch.KERNEL_DIR / launch.SHARED_HEADER).read_text() in text
    assert declared_kernels(text) == declared_kernels(source.read_text())


def test_editing_common_cuh_changes_what_cupy_compiles_and_so_its_cache_key(monkeypatch, tmp_path):
    """CuPy keys its disk cache on (options, source text): a header edit must change the text it is given."""
    gpu_emulation.install(monkeypatch)
    import cupy

    import minimoe.gpu.kernels as kernels

    given = []
    monkeypatch.setattr(cupy, "RawModule", lambda code, options: given.append((code, options)), raising=False)
    folder = tmp_path / "kernels"
    shutil.copytree(launch.KERNEL_DIR, folder)
    monkeypatch.setattr(launch, "KERNEL_DIR", folder)
    kernels.module.__wrapped__("norm.cu")
    header = folder / launch.SHARED_HEADER
    header.write_text(header.read_text().replace("for (int offset = 16;", "for (int offset = 8;"))
    kernels.module.__wrapped__("norm.cu")
    (before, options), (after, same_options) = given
    assert options == same_options == launch.COMPILE_OPTIONS  # no -I: nothing is read from disk at compile time
    assert before != after and "for (int offset = 8;" in after


# --- NVRTC, as CuPy calls it -----------------------------------------------------------------------------------

def nvrtc_library_path() -> str | None:
    """libnvrtc from the ``nvidia-cuda-nvrtc-cu12`` wheel (the test extra), else one on the library path."""
    try:
        import nvidia.cuda_nvrtc
    except ImportError:
        return ctypes.util.find_library("nvrtc")
    found = sorted(Path(next(iter(nvidia.cuda_nvrtc.__path__))).glob("lib/libnvrtc.so*"))
    return str(found[0]) if found else ctypes.util.find_library("nvrtc")


@cache
def nvrtc():
    path = nvrtc_library_path()
    return None if path is None else ctypes.CDLL(path)


def nvrtc_compile(source: str, name: str, options: tuple[str, ...]) -> tuple[int, str, bytes]:
    """(NVRTC result code, compile log, PTX -- empty unless the target is a virtual ``compute_XX``)."""
    lib, program = nvrtc(), ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None) == 0
    try:
        encoded = [o.encode() for o in options]
        result = lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, log)
        ptx = b""
        if result == 0 and any(o.startswith("-arch=compute_") for o in options):
            lib.nvrtcGetPTXSize(program, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(program, buffer)
            ptx = buffer.value
        return result, log.value.decode(errors="replace"), ptx
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_with_nvrtc_and_cupys_options(source, arch):
    if nvrtc() is None:
        pytest.skip("libnvrtc not found: pip install nvidia-cuda-nvrtc-cu12 (in the test extra); NVRTC itself "
                    "needs no GPU")
    text = launch.module_source(source.name)
    options = launch.COMPILE_OPTIONS + CUPY_OPTIONS
    # A real binary (ptxas run inside NVRTC, as for CuPy's cubin path), then PTX to read the entry names.
    result, log, _ = nvrtc_compile(text, source.name, options + (f"-arch={arch}",))
    assert result == 0 and "warning" not in log, log
    result, log, ptx = nvrtc_compile(text, source.name, options + (f"-arch={arch.replace('sm_', 'compute_')}",))
    assert result == 0, log
    assert set(re.findall(r"\.entry\s+(\w+)", ptx.decode())) == declared_kernels(text)


# --- nvcc --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_with_nvcc(source, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (install the CUDA toolkit to compile-check the kernels)")
    cu = tmp_path / source.name
    cu.write_text(launch.module_source(source.name))  # the text CuPy compiles
    command = [nvcc, *launch.COMPILE_OPTIONS, *CUPY_OPTIONS, f"-arch={arch}", "--ptx", "-Werror", "all-warnings",
               str(cu), "-o", str(tmp_path / f"{source.stem}.ptx")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entries = set(re.findall(r"\.entry\s+(\w+)", (tmp_path / f"{source.stem}.ptx").read_text()))
    assert entries == declared_kernels(source.read_text())  # every entry keeps its C name (CuPy looks kernels up by it)


def test_every_kernel_the_wrappers_launch_is_declared_in_its_file():
    wrappers = (launch.KERNEL_DIR.parent / "kernels.py").read_text()
    launched = re.findall(r'kernel\("(\w+\.cu)", f?"([\w{}]+)"\)', wrappers)
    assert len(launched) >= 10
    # the values the f-strings' fields take: the matmuls' kind, input and weight-type variants
    fields = {"suffix": ["bf16", "f32"], "kind": ["gemv", "gemv1", "gemv1_split"]}
    variants = {"gemm": ["_bf16", "_f32", "_swiglu_bf16", "_swiglu_f32"], "gemv": ["_bf16", "_f32", "_glu_bf16", "_glu_f32"]}
    for file_name, name in launched:
        declared = declared_kernels((launch.KERNEL_DIR / file_name).read_text())
        used = re.findall(r"{(\w+)}", name)
        choices = fields | {"variant": variants["gemm" if name.startswith("gemm") else "gemv"]}
        for values in itertools.product(*(choices[field] for field in used)):
            concrete = name
            for field, value in zip(used, values):
                concrete = concrete.replace(f"{{{field}}}", value)
            assert concrete in declared, f"{concrete} is launched from {file_name} but not declared there"


def test_each_kernel_file_names_the_numpy_code_it_replaces():
    for source in SOURCES:
        header = source.read_text().split("#include")[0]
        assert re.search(r"Replaces (the \w+ of |the middle of )?minimoe\.\w+\.\w+", header), source.name
