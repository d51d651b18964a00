"""The model's matrix products by shape: Gorgon's panel kernel against the products torch ships (MKL's
`mm` over the same [in, out] weights, and oneDNN's linear over its own packed layout), in GFLOP/s.

Shapes: every projection of the embedded default model and of a 0.5B-class Qwen2 (hidden 896,
intermediate 4,864), at row counts from one decode row to a 512-token prompt chunk. Each product runs
on weights already in cache (the last-level cache holds them on most servers), so the single-row figures
are an upper bound that batch-1 decode, which streams weights from memory, does not reach. The three
sides run in turn per shape, medians of several runs. `ratio_min` is the lowest of the panel kernel's
rate over the faster torch product across the shapes at each row count.

Run with `--cpu-class avx2` on an AVX-512 machine to measure the AVX2 build against MKL and oneDNN held
to AVX2.
"""

from __future__ import annotations

import statistics

import torch

from benchmarks.common import Timer, cpu_description, parse_args, report
from models import kernels
from models.layers import _ONEDNN_LINEAR, _ONEDNN_PACK

SHAPES = {   # name -> (in_features, out_features)
    "default.qkv": (320, 960), "default.gate_up": (320, 1728), "default.down": (864, 320),
    "default.lm_head": (320, 8192),
    "0p5b.qkv": (896, 1152), "0p5b.o_proj": (896, 896), "0p5b.gate_up": (896, 9728), "0p5b.down": (4864, 896),
}
ROWS = (1, 4, 8, 16, 64, 256, 512)


def _seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        with Timer() as t:
            run()
        times.append(t.seconds)
    return statistics.median(times)


def main() -> None:
    args = parse_args(__doc__)
    if not kernels.native_ops_available(torch.device("cpu"), torch.float32):
        raise SystemExit("the native kernels do not build here: nothing to compare")
    rows_list = (1, 8, 64, 512) if args.quick else ROWS
    generator = torch.Generator().manual_seed(0)
    table = {}
    for name, (k, n) in SHAPES.items():
        weight_t = torch.randn(k, n, generator=generator) / k ** 0.5
        panels = kernels.pack_panels(weight_t)
        onednn = _ONEDNN_PACK(weight_t.t().contiguous(), 32) if _ONEDNN_PACK is not None else None
        for rows in rows_list:
            x = torch.randn(rows, k, generator=generator)
            repeats = max(3, min(100, int(1e8 / (rows * k * n))))
            sides = {"panel": lambda: kernels.gemm_panels(x, panels, n), "mm": lambda: x @ weight_t}
            if onednn is not None:
                sides["onednn"] = lambda: _ONEDNN_LINEAR(x, onednn, None, "none", [], "")
            gflop = 2 * rows * k * n / 1e9
            rates = {side: round(gflop / _seconds(run, repeats), 1) for side, run in sides.items()}
            best_torch = max(rate for side, rate in rates.items() if side != "panel")
            table[f"{name}@{rows}"] = {**rates, "ratio": round(rates["panel"] / best_torch, 3)}
    ratio_min = {rows: min(v["ratio"] for key, v in table.items() if key.endswith(f"@{rows}")) for rows in rows_list}
    report({"benchmark": "products", "unit": "GFLOP/s", **cpu_description(), "shapes": table,
            "ratio_min_by_rows": ratio_min,
            "ratio_median": statistics.median(v["ratio"] for v in table.values())}, args.json)


if __name__ == "__main__":
    main()
