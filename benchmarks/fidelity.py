"""How far a quantized model's next-token distributions are from its float32 weights', per format.

For each format, the same model is loaded twice, float32 and quantized (a GGUF file's own blocks, or
quantized at load), and both score the same held-out text (teacher forcing, every position): the mean
KL(float32 || quantized) in nats per token, its 99th percentile, the share of positions whose argmax
agrees, and whether any logit is NaN. The text is English prose and code that neither the model's
training nor this project wrote for it (the README and the Python sources of the standard library's
`json` package), cut into 512-token windows.

Default model: SmolLM2-135M-Instruct from its Q4_1 GGUF (`--model smollm2`): "float32" is that file
dequantized, Q4_1 is the file's own blocks, and Q8_0 / Q4_0 are its float weights quantized at load, as
llama.cpp's quantize tool would write them (round to nearest).
"""

from __future__ import annotations

import json as json_module
from pathlib import Path

import torch

from benchmarks.common import cpu_description, parse_args, report
from decoding import Engine, SamplingParams


def prompt_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """The logits the engine's model computes at every position of ids ([len, vocab]): a scored prompt's
    chunk logits, as the runner returns them, recorded on their way out."""
    captured: list[torch.Tensor] = []
    execute = engine.runner.execute

    def recording(sched):
        out = execute(sched)
        captured.extend(out.chunk.values())
        return out

    engine.runner.execute = recording
    try:
        engine.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    finally:
        del engine.runner.execute
    return torch.cat(captured)


def compare(reference: Engine, engine: Engine, windows: list[list[int]]) -> dict:
    """KL(reference || engine) per position, top-1 agreement and NaNs, over every window."""
    kls, agree, total, nan = [], 0, 0, False
    for ids in windows:
        p_log = prompt_logits(reference, ids).log_softmax(-1)
        q_logits = prompt_logits(engine, ids)
        nan |= bool(torch.isnan(q_logits).any())
        q_log = q_logits.log_softmax(-1)
        kls.append((p_log.exp() * (p_log - q_log)).sum(-1))
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        total += p_log.shape[0]
    kl = torch.cat(kls)
    return {"kl_mean": float(kl.mean()), "kl_p99": float(kl.quantile(0.99)), "top1_agreement": agree / total,
            "positions": total, "nan": nan}


def held_out_windows(tokenizer, count: int, length: int = 512) -> list[list[int]]:
    sources = [Path(__file__).resolve().parents[1] / "README.md",
               *sorted(Path(json_module.__file__).parent.glob("*.py"))]
    ids = tokenizer.encode("\n\n".join(path.read_text() for path in sources))
    return [ids[i * length:(i + 1) * length] for i in range(min(count, len(ids) // length))]


def main() -> None:
    def extra(parser):
        parser.add_argument("--formats", default="auto,q8_0,q4_0", help="quantization schemes to compare "
                            "(auto: the GGUF file's own blocks)")
        parser.add_argument("--windows", type=int, default=8, help="512-token windows of held-out text")

    args = parse_args(__doc__.splitlines()[0], extra)
    model = args.model or "smollm2"
    options = dict(model=model, show_progress=False, kv_cache_memory_gb=0.5)
    reference = Engine(quantization="none", **options)
    windows = held_out_windows(reference.tokenizer, 2 if args.quick else args.windows)
    results = {}
    for scheme in args.formats.split(","):
        engine = Engine(quantization=scheme, **options)
        results[engine.loaded.quantization or scheme] = compare(reference, engine, windows)
        del engine
    report({"model": model, **cpu_description(), "windows": len(windows), "formats": results}, args.json)


if __name__ == "__main__":
    main()
