"""The load routes (Gorgon's, vLLM's and SGLang's) answered for the whole cluster from every live
replica's answer: SGLang's per-rank lists get one entry per replica, its index as the rank; counts add up."""

from __future__ import annotations

MERGED_LOADS = ("/v1/load", "/load", "/v1/loads", "/get_load")


def merge_loads(path: str, answers: list[tuple[int, object]]) -> object:
    """`answers`: (replica index, that replica's JSON answer) for each live replica."""
    if path == "/v1/loads":
        return {"timestamp": max(a["timestamp"] for _, a in answers),
                "loads": [{**entry, "dp_rank": index} for index, a in answers for entry in a["loads"]]}
    if path == "/get_load":
        return [{**entry, "dp_rank": index} for index, a in answers for entry in a]
    if path == "/load":
        return {"server_load": sum(a["server_load"] for _, a in answers)}
    return _summed([a for _, a in answers])


def _summed(figures: list[dict]) -> dict:
    """Gorgon's /v1/load over replicas: counts summed, the token usage recomputed from the sums, the
    rest (the version, the pause state) as the replicas agree on it (the first one's otherwise)."""
    merged = dict(figures[0])
    for key, value in figures[0].items():
        if isinstance(value, int) and not isinstance(value, bool) and key != "weight_version":
            merged[key] = sum(f[key] for f in figures)
    if merged.get("num_total_tokens"):
        merged["token_usage"] = round(merged["num_used_tokens"] / merged["num_total_tokens"], 4)
    return merged
