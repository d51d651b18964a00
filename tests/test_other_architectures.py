"""The native kernels on an architecture this machine is not: built for 64-bit ARM (NEON) with a cross
compiler, the panel GEMM run under qemu against a reference (tests/native/gemm_check.c), and every kernel
source compiled for ARM. Skipped where the cross toolchain or qemu is absent (.ci/run installs both)."""

import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "models" / "kernels"
CHECK = Path(__file__).with_name("native") / "gemm_check.c"
CROSS_CC, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", "/usr/aarch64-linux-gnu"
FLAGS = ["-O3", "-march=armv8-a", "-ffp-contract=fast", "-fopenmp", "-std=c11", "-Wall", "-Werror"]

needs_cross = pytest.mark.skipif(shutil.which(CROSS_CC) is None or shutil.which(QEMU) is None,
                                 reason=f"{CROSS_CC} or {QEMU} is not installed")


@needs_cross
def test_every_kernel_builds_for_arm(tmp_path):
    sources = sorted(map(str, KERNELS.glob("*.c")))
    subprocess.run([CROSS_CC, *FLAGS, "-fPIC", "-shared", *sources, "-o", str(tmp_path / "kernels.so"), "-lm"],
                   check=True, capture_output=True, text=True, timeout=300)


@needs_cross
def test_panel_product_on_neon_matches_the_reference(tmp_path):
    binary = tmp_path / "gemm_check"
    subprocess.run([CROSS_CC, *FLAGS, f"-I{KERNELS}", str(CHECK), str(KERNELS / "gemm.c"), str(KERNELS / "threads.c"),
                    "-o", str(binary), "-lm"], check=True, capture_output=True, text=True, timeout=300)
    result = subprocess.run([QEMU, "-L", SYSROOT, str(binary)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-1000:]
