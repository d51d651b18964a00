"""Choose a Medusa candidate tree from how well the heads predict the model's own greedy continuations.

    python -m training.medusa_tree --model models/default/target --heads models/default/medusa

For every position t of greedy continuations of held-out prompts, the heads read the hidden state at t
and rank the vocabulary for positions t + 2, t + 3, ...; greedy verification at t accepts the longest
tree path whose ranks equal the ranks the true tokens got. Decoding then jumps to t + 1 + accepted, so
tokens per step are counted by walking each continuation the way the decoder does (averaging over every
position would overcount: the positions where long paths are accepted are the ones a decoder skips).
The tree grows one node at a time, each time by the node that most raises the walked tokens per step
(the Medusa paper's construction, counted on the model instead of estimated from per-head accuracies).
Which size is fastest depends on what a wider verification costs on the machine: the command prints the
tokens per step of every size for benchmarks/medusa.py to confirm.

The prompts skip the held-out files the benchmarks read, so the tree is not tuned on its own test.
With `--answers A.jsonl` (an instruct model's self-distilled chat answers, training/medusa_distill.py)
the continuations are instead the greedy answers of the samples the heads were not trained on, read from
the features cached beside them: no generation, and no benchmark prompt either (those are of held-out
subjects, training/chat_prompts.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from training.evaluate import heldout_texts

# The benchmarks draw their prompts from the first held-out files; tuning starts past them.
SKIP_FILES = 40


def rank_vectors(model_path: str, heads_path: str, num_prompts: int, prompt_tokens: int, new_tokens: int,
                 top_k: int) -> list[list[tuple[int, ...]]]:
    """Per greedy continuation, per position from the prompt's last token on: for each head, the rank of
    the true token among that head's top_k (top_k when it is not among them)."""
    from transformers import AutoModelForCausalLM

    from decoding import Engine, SamplingParams
    from models.medusa import MedusaHeads

    engine = Engine(model=model_path, show_progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    heads = MedusaHeads.load(heads_path)
    prompts = []
    for text in heldout_texts(Path.home() / ".cache" / "gorgon" / "corpus")[SKIP_FILES:]:
        ids = engine.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) >= 4 * prompt_tokens:
            prompts.append(ids[len(ids) // 3 : len(ids) // 3 + prompt_tokens])
        if len(prompts) == num_prompts:
            break
    params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens)
    continuations = []
    with torch.inference_mode():
        for prompt, output in zip(prompts, engine.generate(prompts, params)):
            tokens = prompt + output.outputs[0].token_ids
            hidden = hf.model(torch.tensor([tokens])).last_hidden_state[0]          # after the final norm
            vectors = []
            for t in range(len(prompt) - 1, len(tokens) - 2 - heads.num_heads):
                top = heads(hidden[t : t + 1])[:, 0].topk(top_k, dim=-1).indices       # [K, top_k]
                vector = []
                for k in range(heads.num_heads):
                    match = (top[k] == tokens[t + 2 + k]).nonzero()
                    vector.append(int(match[0, 0]) if match.numel() else top_k)
                vectors.append(tuple(vector))
            continuations.append(vectors)
    return continuations


@torch.inference_mode()
def rank_vectors_from_answers(model_path: str, heads_path: str, answers: Path, top_k: int) -> list[list[tuple[int, ...]]]:
    """As rank_vectors, over the greedy answers of the samples medusa_distill held out."""
    from transformers import AutoModelForCausalLM

    from models.medusa import MedusaHeads
    from training.draft_features import answer_features, read_samples
    from training.medusa_distill import HELDOUT_EVERY

    samples = read_samples(answers)
    features = answer_features(model_path, samples, answers.with_suffix(".features.pt"))
    output_head = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).get_output_embeddings().weight
    heads = MedusaHeads.load(heads_path, output_head=output_head)
    continuations = []
    for index in range(0, len(samples), HELDOUT_EVERY):
        if samples[index]["temperature"] != 0:
            continue
        rows = (features.sample == index).nonzero().squeeze(1)
        if rows.numel() <= heads.num_heads:
            continue
        top = heads.token_ids(heads(features.hidden[rows].float()).topk(top_k, dim=-1).indices)   # [K, T, top_k]
        truth = features.next_tokens[rows, 1 : 1 + heads.num_heads].t()                          # [K, T]
        hits = top == truth[..., None]
        ranks = torch.where(hits.any(-1), hits.int().argmax(-1), top_k)                           # [K, T]
        usable = (truth >= 0).all(0)
        continuations.append([tuple(column) for column in ranks.t()[usable].tolist()])
    return continuations


def tokens_per_step(tree: set[tuple[int, ...]], continuations: list[list[tuple[int, ...]]]) -> float:
    """Walk each continuation as greedy Medusa decoding would: a step at t keeps the longest tree path
    matching t's ranks, emits it plus the target's own token, and the next step starts after them."""
    tokens = steps = 0
    for vectors in continuations:
        t = 0
        while t < len(vectors):
            vector, depth = vectors[t], 0
            while depth < len(vector) and vector[: depth + 1] in tree:
                depth += 1
            tokens += 1 + depth
            steps += 1
            t += 1 + depth
    return tokens / max(steps, 1)


def grow_tree(continuations: list[list[tuple[int, ...]]], max_nodes: int,
              top_k: int) -> list[tuple[tuple[int, ...], float]]:
    """Nodes in the order greedy growth adds them, each with the tokens per step of the tree so far."""
    seen = {vector[:depth] for vectors in continuations for vector in vectors
            for depth in range(1, len(vector) + 1) if max(vector[:depth]) < top_k}
    tree: set[tuple[int, ...]] = set()
    grown: list[tuple[tuple[int, ...], float]] = []
    while len(grown) < max_nodes:
        candidates = [path for path in seen - tree if len(path) == 1 or path[:-1] in tree]
        if not candidates:
            break
        score, path = max((tokens_per_step(tree | {path}, continuations), [-r for r in path], path)
                          for path in candidates)[0::2]
        tree.add(path)
        grown.append((path, score))
    return grown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--heads", required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-nodes", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--answers", type=Path, default=None, help="tune on these self-distilled answers' held-out part")
    parser.add_argument("--save-nodes", type=int, default=None,
                        help="write the first N grown nodes into the heads' config.json as their medusa_choices")
    args = parser.parse_args()
    if args.answers is not None:
        continuations = rank_vectors_from_answers(args.model, args.heads, args.answers, args.top_k)
    else:
        continuations = rank_vectors(args.model, args.heads, args.prompts, args.prompt_tokens, args.new_tokens,
                                     args.top_k)
    rows = [{"nodes": size, "path": list(path), "tokens_per_step": round(score, 3)}
            for size, (path, score) in enumerate(grow_tree(continuations, args.max_nodes, args.top_k), start=1)]
    if args.save_nodes:
        config_path = Path(args.heads) / "config.json"
        config = json.loads(config_path.read_text())
        config["medusa_choices"] = [row["path"] for row in rows[: args.save_nodes]]
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    print(json.dumps({"positions": sum(map(len, continuations)), "tree": rows}))


if __name__ == "__main__":
    main()
