"""The GPU carry: a wheel too large to travel is split in two tar.xz files that unpack to its tree,
and bitsandbytes keeps only the library the GPU image's CUDA loads."""

import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import gpu_wheels  # noqa: E402

sys.path.pop(0)


def make_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_the_cutlass_libraries_split_in_two_and_unpack_to_the_wheels_tree(tmp_path):
    files = {
        "nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so": os.urandom(3000) * 4,
        "nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so": (
            b"\x7fELF" + os.urandom(5000) * 3
        ),
        "nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir_version_cu13.py": b"version = '4.8.1'\n",
        "nvidia_cutlass_dsl_libs_cu13-4.8.1.dist-info/METADATA": b"Name: nvidia-cutlass-dsl-libs-cu13\n",
    }
    wheel = make_wheel(tmp_path / "nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl", files)
    (runtime_dir := tmp_path / "fa4").mkdir()
    (ir_dir := tmp_path / "fa4-ir").mkdir()
    runtime, ir = gpu_wheels.split_cutlass_libs(wheel, runtime_dir, ir_dir)
    assert runtime.name.endswith("-runtime.tar.xz") and ir.name.endswith("-ir.tar.xz")
    with tarfile.open(ir) as t:
        assert [m.name for m in t.getmembers()] == [n for n in files if "_cutlass_ir.cu13" in n]
    site = tmp_path / "site"
    for part in (runtime, ir):  # as gpu_check.sh unpacks them
        with tarfile.open(part) as t:
            t.extractall(site, filter="data")
    unpacked = {str(p.relative_to(site)): p.read_bytes() for p in site.rglob("*") if p.is_file()}
    assert unpacked == files
    assert os.access(site / next(n for n in files if n.endswith("runtime.so")), os.X_OK)


def test_a_wheel_without_the_compiler_library_is_refused(tmp_path):
    wheel = make_wheel(tmp_path / "x-1-cp312-cp312-any.whl", {"nvidia_cutlass_dsl/cu13/lib/a.so": b"a"})
    with pytest.raises(SystemExit, match="expected one _cutlass_ir"):
        gpu_wheels.split_cutlass_libs(wheel, tmp_path, tmp_path)


def test_bitsandbytes_keeps_the_cuda_13_and_cpu_libraries_only(tmp_path):
    names = [
        "bitsandbytes/__init__.py",
        "bitsandbytes/libbitsandbytes_cpu.so",
        "bitsandbytes/libbitsandbytes_cuda130.so",
        "bitsandbytes/libbitsandbytes_cuda128.so",
        "bitsandbytes/libbitsandbytes_rocm71.so",
        "bitsandbytes-0.50.2.dist-info/METADATA",
    ]
    wheel = make_wheel(
        tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl", {n: n.encode() for n in names}
    )
    (out := tmp_path / "out").mkdir()
    slim = gpu_wheels.slim_bitsandbytes(wheel, out)
    with zipfile.ZipFile(slim) as z:
        assert sorted(z.namelist()) == sorted(n for n in names if "cuda128" not in n and "rocm" not in n)
        assert z.read("bitsandbytes/libbitsandbytes_cuda130.so") == b"bitsandbytes/libbitsandbytes_cuda130.so"
