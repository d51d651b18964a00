"""The native kernels on an architecture this machine is not: built for 64-bit ARM (NEON) with a cross
compiler, the panel GEMM run under qemu against a reference (tests/native/gemm_check.c), the quantized
product against this machine's own results, bit for bit (tests/native/quant_check.c), and every kernel
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


@needs_cross
def test_quantized_product_on_arm_gives_this_machines_bits(tmp_path):
    import numpy as np
    import torch

    from models import kernels
    from models import quantization as Q

    if not kernels.native_ops_available(torch.device("cpu"), torch.float32):
        pytest.skip("the native kernels do not build on this machine")
    torch.manual_seed(0)
    cases = []
    for index, (name, rows, in_features, out_features) in enumerate(
            [("q8_0", 1, 96, 40), ("q4_1", 5, 128, 33), ("q6_k", 9, 64, 16), ("q4_k", 3, 160, 50), ("q4_0", 13, 96, 20)]):
        blocks = Q.quantize(torch.randn(out_features, in_features), Q.FORMATS[name])
        packed, weights = Q.pack(blocks), kernels.LinearWeights()
        fmt = blocks.format
        weights.segments = 1
        weights.segment[0] = kernels.QuantSegment(packed.data_ptr(), fmt.kind, fmt.block, fmt.scale_dtype.itemsize,
                                                  out_features)
        x = torch.randn(rows, in_features)
        y = kernels.linear_product(x, weights, out_features)
        header = np.array([rows, in_features, out_features, fmt.kind, fmt.block, fmt.scale_dtype.itemsize,
                           packed.numel()], dtype=np.int64)
        case = tmp_path / f"case{index}.bin"
        case.write_bytes(header.tobytes() + packed.numpy().tobytes() + x.numpy().tobytes() + y.numpy().tobytes())
        cases.append(str(case))
    binary = tmp_path / "quant_check"
    subprocess.run([CROSS_CC, *FLAGS, f"-I{KERNELS}", str(CHECK.with_name("quant_check.c")),
                    *(str(KERNELS / name) for name in ("quant_gemm.c", "bf16_gemm.c", "gemm.c", "threads.c")),
                    "-o", str(binary), "-lm"], check=True, capture_output=True, text=True, timeout=300)
    result = subprocess.run([QEMU, "-L", SYSROOT, str(binary), *cases], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout[-2000:] + result.stderr[-1000:]
