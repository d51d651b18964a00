"""Push every weight of the served model to a server on this machine and time it end to end, by transport,
interleaved push for push:
- `http`: one safetensors body over loopback (serialization, transfer, validation, copy into the engine);
- `shared_memory`: the tensors copied into a file in /dev/shm that the server reads in place;
- `shared_memory_adopted`: the trainer's parameters living in that file (GorgonClient.share_weights, as a
  trainer on the server's machine sets it up once), so a push copies nothing on the trainer's side. A
  trainer pushes the same file every step and the server keeps the last file mapped, so this is the
  second of two pushes in a row; the first (which maps the file again after the other transports' pushes)
  is `shared_memory_adopted_first`.
`gb_per_s` is the HTTP figure (the key earlier reports carried); `same_host_gb_per_s` the adopted one.
"""

from __future__ import annotations

import statistics

import torch
from transformers import AutoModelForCausalLM

from benchmarks.common import Timer, benchmark_model_path, gorgon_server, parse_args, report
from client import GorgonClient

TRANSPORTS = ("http", "shared_memory", "shared_memory_adopted_first", "shared_memory_adopted")


def main() -> None:
    args = parse_args(__doc__)
    path = benchmark_model_path(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    adopted = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
    num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    repeats = 3 if args.quick else 9
    with gorgon_server(path, "--dtype", args.dtype, "--admin-key", "bench") as url:
        client = GorgonClient(url, admin_key="bench")
        sharing = GorgonClient(url, admin_key="bench")
        sharing.share_weights(adopted)
        pushes = {"http": lambda: client.push_weights(model, transport="http"),
                  "shared_memory": lambda: client.push_weights(model, transport="shared_memory"),
                  "shared_memory_adopted_first": lambda: sharing.push_weights(adopted, transport="shared_memory"),
                  "shared_memory_adopted": lambda: sharing.push_weights(adopted, transport="shared_memory")}
        for push in pushes.values():                                          # warm-up
            push()
        times: dict[str, list[float]] = {name: [] for name in TRANSPORTS}
        for _ in range(repeats):
            for name in TRANSPORTS:
                with Timer() as t:
                    pushes[name]()
                times[name].append(t.seconds)
        version = client.weight_version()
        client.close()
        sharing.close()
    rates = {name: sorted(num_bytes / s / 1e9 for s in seconds) for name, seconds in times.items()}
    report({"benchmark": "weights", "model": path, "dtype": args.dtype, "parameters_mb": round(num_bytes / 1e6, 1),
            "seconds": round(statistics.median(times["http"]), 4),
            "gb_per_s": round(statistics.median(rates["http"]), 3),
            "same_host_gb_per_s": round(statistics.median(rates["shared_memory_adopted"]), 3),
            "by_transport": {name: {"median_gb_per_s": round(statistics.median(r), 3),
                                    "min": round(r[0], 3), "max": round(r[-1], 3)} for name, r in rates.items()},
            "weight_version": version, "repeats": repeats}, args.json)


if __name__ == "__main__":
    main()
