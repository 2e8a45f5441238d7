"""The bundled demo task: spell a sequence of digits as words.

``spell 3 1 4 =`` → `` three one four``. It is a deterministic rule (so a held-out split of
unseen digit sequences measures learning, not memorisation) that a tiny model learns in about
a minute on two CPU cores: each output word depends on one input digit at a fixed distance.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ASSETS = Path(__file__).parent / "assets"
TRAIN_FILE = ASSETS / "demo_train.jsonl"
HELDOUT_FILE = ASSETS / "demo_heldout.jsonl"


def make_example(digits: list[int]) -> dict[str, str]:
    """One prompt/completion row for a digit sequence."""
    return {
        "prompt": "spell " + " ".join(str(d) for d in digits) + " =",
        "completion": " " + " ".join(WORDS[d] for d in digits),
    }


def make_splits(
    *, n_train: int = 2000, n_heldout: int = 64, length: int = 4, seed: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Disjoint train and held-out splits of distinct random digit sequences."""
    rng = random.Random(seed)
    space = 10**length
    if n_train + n_heldout > space:
        raise ValueError("not enough distinct sequences for the requested split sizes")
    codes = rng.sample(range(space), n_train + n_heldout)
    rows = [make_example([int(c) for c in f"{code:0{length}d}"]) for code in codes]
    return rows[:n_train], rows[n_train:]


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after stripping whitespace."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not references:
        return 0.0
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return hits / len(references)


def heldout_exact_match(base_dir: str | Path, adapter_dir: str | Path) -> float:
    """Greedy exact match of an adapter on the held-out prompts (8 new tokens, as served)."""
    from workers.base_model import load_base
    from workers.datasets import read_jsonl
    from workers.generate import greedy_generate
    from workers.lora import load_adapter

    rows = read_jsonl(HELDOUT_FILE)
    model, tok = load_base(base_dir)
    load_adapter(model, adapter_dir)
    answers = greedy_generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=8)
    return exact_match(answers, [r["completion"] for r in rows])


def write_jsonl(rows: list[dict[str, str]], path: Path) -> None:
    """Write rows as JSON Lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def corpus_text() -> str:
    """Text the tiny tokenizer is trained on: general English plus the demo task's words."""
    text = (ASSETS / "corpus.txt").read_text()
    train, _ = make_splits()
    return text + "\n".join(r["prompt"] + r["completion"] for r in train[:500]) + "\n"


if __name__ == "__main__":  # regenerate the bundled files
    tr, ho = make_splits()
    write_jsonl(tr, TRAIN_FILE)
    write_jsonl(ho, HELDOUT_FILE)
