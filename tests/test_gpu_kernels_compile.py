"""Every CUDA kernel compiles with nvcc for the GPUs we target, and the wrappers launch kernels that exist."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from minimoe.gpu import launch

SOURCES = launch.kernel_sources()
ARCHITECTURES = ("sm_80", "sm_90")  # A100, H100/H200


def test_the_kernel_folder_has_the_kernels():
    assert {p.name for p in SOURCES} == {"attention.cu", "matmul.cu", "moe.cu", "norm.cu", "rope.cu", "router.cu",
                                         "swiglu.cu"}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernel_compiles_with_nvcc(source, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (install the CUDA toolkit to compile-check the kernels)")
    # The options CuPy's RawModule compiles with at run time (minimoe.gpu.kernels.module), -Werror added.
    command = [nvcc, "-std=c++17", f"-arch={arch}", "--ptx", f"-I{launch.KERNEL_DIR}", "-Werror", "all-warnings",
               str(source), "-o", str(tmp_path / f"{source.stem}.ptx")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    entries = set(re.findall(r"\.entry\s+(\w+)", (tmp_path / f"{source.stem}.ptx").read_text()))
    declared = set(re.findall(r'extern "C" __global__ void (\w+)', source.read_text()))
    assert entries == declared  # every entry point keeps its C name (CuPy looks kernels up by it)


def test_every_kernel_the_wrappers_launch_is_declared_in_its_file():
    wrappers = (launch.KERNEL_DIR.parent / "gpu" / "kernels.py").read_text()
    launched = re.findall(r'kernel\("(\w+\.cu)", f?"([\w{}]+)"\)', wrappers)
    assert len(launched) >= 10
    for file_name, name in launched:
        declared = re.findall(r'extern "C" __global__ void (\w+)\(', (launch.KERNEL_DIR / file_name).read_text())
        for suffix in ("bf16", "f32"):  # the weight-type variants of the matmuls
            assert name.replace("{suffix}", suffix) in declared, f"{name} is launched from {file_name} but not declared there"


def test_each_kernel_file_names_the_numpy_code_it_replaces():
    for source in SOURCES:
        header = source.read_text().split("#include")[0]
        assert re.search(r"Replaces (the \w+ of |the middle of )?minimoe\.\w+\.\w+", header), source.name
