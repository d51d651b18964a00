"""Push every weight of the served model over loopback HTTP (safetensors body, one request) and time
it end to end: serialization, transfer, validation and copy into the engine."""

from __future__ import annotations

import statistics

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import Timer, benchmark_model_path, gorgon_server, parse_args, report
from client import GorgonClient


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    repeats = 2 if args.quick else 5
    with gorgon_server(path, "--dtype", args.dtype, "--admin-key", "bench") as url:
        client = GorgonClient(url, admin_key="bench")
        client.push_weights(model)                                             # warm-up
        times = []
        for _ in range(repeats):
            with Timer() as t:
                client.push_weights(model)
            times.append(t.seconds)
        version = client.weight_version()
    seconds = statistics.median(times)
    report({"benchmark": "weights", "model": path, "dtype": args.dtype, "parameters_mb": round(num_bytes / 1e6, 1),
            "seconds": round(seconds, 3), "gb_per_s": round(num_bytes / seconds / 1e9, 3),
            "weight_version": version, "repeats": repeats}, args.json)


if __name__ == "__main__":
    main()
