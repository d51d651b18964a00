"""Chat prompts for self-distillation and for the speculation benchmarks on an instruct model.

No prompt dataset reaches this machine, so the prompts are built here, deterministically, from two
sources every machine with Python has: general subjects (below) asked about in the ways people ask a
chat assistant, and the standard library's own functions (their names, signatures and docstrings) asked
about as coding questions. The split is by subject, so a held-out prompt never shares its subject with a
training prompt: what the benchmarks measure is how drafting generalises, not how it memorised.

    python -m training.chat_prompts --split heldout --count 5
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import random
import sysconfig
from pathlib import Path

HELDOUT_EVERY = 8             # 1 subject in 8 is held out

SUBJECTS = (
    "photosynthesis", "the water cycle", "black holes", "plate tectonics", "the immune system", "vaccines",
    "climate change", "renewable energy", "solar panels", "wind turbines", "electric cars", "batteries",
    "the French Revolution", "the Roman Empire", "ancient Egypt", "the Renaissance", "the Industrial Revolution",
    "the printing press", "the internet", "the World Wide Web", "email", "social media", "smartphones",
    "machine learning", "neural networks", "large language models", "databases", "cloud computing",
    "cybersecurity", "passwords", "encryption", "blockchain", "open source software", "version control",
    "recursion", "sorting algorithms", "binary search", "hash tables", "linked lists", "graph algorithms",
    "dynamic programming", "unit testing", "code review", "technical debt", "APIs", "microservices",
    "healthy eating", "sleep", "exercise", "meditation", "stress", "time management", "procrastination",
    "public speaking", "job interviews", "writing a resume", "negotiating a salary", "remote work",
    "team meetings", "leadership", "giving feedback", "learning a new language", "learning to code",
    "studying for exams", "reading books", "keeping a journal", "personal finance", "budgeting", "saving money",
    "investing", "inflation", "interest rates", "credit cards", "buying a house", "renting an apartment",
    "gardening", "houseplants", "composting", "cooking pasta", "baking bread", "making coffee", "tea",
    "chocolate", "vegetarian diets", "food waste", "recycling", "plastic pollution", "the ocean", "coral reefs",
    "rainforests", "deserts", "mountains", "volcanoes", "earthquakes", "hurricanes", "the Moon", "Mars",
    "the solar system", "stars", "galaxies", "gravity", "electricity", "magnetism", "light", "sound",
    "atoms", "chemical reactions", "DNA", "evolution", "dinosaurs", "bees", "birds", "dogs", "cats",
    "horses", "whales", "octopuses", "friendship", "kindness", "happiness", "music", "jazz", "classical music",
    "painting", "photography", "poetry", "novels", "film", "theatre", "chess", "football", "basketball",
    "running", "cycling", "swimming", "hiking", "camping", "travel", "trains", "airplanes", "bridges",
    "skyscrapers", "cities", "villages", "libraries", "museums", "schools", "universities", "teachers",
    "democracy", "elections", "taxes", "the economy", "supply and demand", "small businesses", "marketing",
    "customer service", "artificial intelligence ethics", "privacy", "misinformation", "critical thinking",
    "the scientific method", "statistics", "probability", "prime numbers", "fractions", "geometry",
    "algebra", "calculus", "maps", "weather forecasts", "clocks", "calendars", "holidays", "birthdays",
    "weddings", "parenting", "moving to a new city", "making friends", "volunteering", "pets", "robots",
)

TEMPLATES = (
    "Explain {s} to a ten-year-old.",
    "What is {s}? Answer in a short paragraph.",
    "Give me three interesting facts about {s}.",
    "Write a short poem about {s}.",
    "What are the pros and cons of {s}?",
    "Summarize what everyone should know about {s}.",
    "I am new to {s}. Where should I start?",
    "Write a haiku about {s}.",
    "List five tips related to {s}.",
    "Why does {s} matter?",
    "Write a short story that involves {s}.",
    "What are common misconceptions about {s}?",
    "Describe {s} in exactly three sentences.",
    "Can you give me a simple analogy for {s}?",
    "Write a tweet about {s}.",
    "What questions should I ask an expert on {s}?",
    "How has {s} changed over the last hundred years?",
    "Write a short dialogue between two friends talking about {s}.",
    "Give a step-by-step beginner's guide to {s}.",
    "What is the most surprising thing about {s}?",
)

CODE_TEMPLATES = (
    "Write a Python function `{name}{signature}` that does the following: {doc}",
    "What does the Python function `{qualified}` do? Explain with an example.",
    "Explain this Python code:\n```python\n{source}\n```",
    "Write unit tests for this function:\n```python\n{source}\n```",
    "How could I improve this Python function?\n```python\n{source}\n```",
)

MAX_SOURCE_LINES = 18


def is_heldout(subject: str) -> bool:
    return int(hashlib.sha256(subject.encode()).hexdigest()[:8], 16) % HELDOUT_EVERY == 0


def stdlib_functions(root: Path | None = None) -> list[dict[str, str]]:
    """Short documented top-level functions of the standard library: name, signature, first docstring line,
    source, in a stable order."""
    root = root or Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in sorted(root.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if not doc or length > MAX_SOURCE_LINES:
                continue
            found.append({"module": path.stem, "name": node.name,
                          "signature": "(" + ast.unparse(node.args) + ")",
                          "doc": doc.strip().splitlines()[0].rstrip("."),
                          "source": "\n".join(lines[node.lineno - 1 : node.end_lineno])})
    return found


def prompts(split: str, seed: int = 0) -> list[str]:
    """Every prompt of `split` ("train" or "heldout"), shuffled by `seed`: each subject under every
    template, and each standard-library function under one code template chosen by its name."""
    wanted = split == "heldout"
    out = [template.format(s=subject) for subject in SUBJECTS if is_heldout(subject) == wanted
           for template in TEMPLATES]
    for function in stdlib_functions():
        qualified = f"{function['module']}.{function['name']}"
        if is_heldout(qualified) != wanted:
            continue
        template = CODE_TEMPLATES[int(hashlib.sha256(qualified.encode()).hexdigest()[:8], 16) % len(CODE_TEMPLATES)]
        out.append(template.format(qualified=qualified, **function))
    random.Random(seed).shuffle(out)
    return out


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """One user turn in the model's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=["train", "heldout"], default="train")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    selected = prompts(args.split, args.seed)
    for prompt in selected[: args.count]:
        print(json.dumps(prompt))
    print(json.dumps({"split": args.split, "prompts": len(selected)}))


if __name__ == "__main__":
    main()
