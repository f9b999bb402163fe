"""Build the shipped offline lm-eval tasks from Python's own documentation (`pydoc_data.topics`,
PSF-licensed text every Python installation carries): `trainers/tools/tasks/*.jsonl`.

    python scripts/make_eval_tasks.py      # deterministic: rerunning rewrites the same files

- dtlab_next_line: a line of the docs, and four candidate next lines (the true one and three other
  lines of similar length from elsewhere); multiple choice, accuracy (chance 0.25).
- dtlab_cloze: a sentence of the docs without its last word; the word is the target (greedy-match
  accuracy and perplexity, as LAMBADA scores it).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "trainers" / "tools" / "tasks"
ITEMS = 150


def prose_lines(text: str) -> list[str]:
    return [s for s in (line.strip() for line in text.splitlines())
            if 40 <= len(s) <= 100 and sum(c.isalpha() or c == " " for c in s) > 0.9 * len(s)]


def next_line_items(topics: dict[str, str], rng: random.Random) -> list[dict]:
    pairs, pool = [], []
    for key in sorted(topics):
        lines = prose_lines(topics[key])
        pool += lines
        pairs += [(a, b) for a, b in zip(lines, lines[1:], strict=False) if a != b]
    rng.shuffle(pairs)
    items = []
    for context, answer in pairs[:ITEMS]:
        others = [s for s in rng.sample(pool, 40) if s not in (context, answer)][:3]
        choices = others + [answer]
        rng.shuffle(choices)
        items.append({"context": context, "choices": choices, "label": choices.index(answer)})
    return items


def cloze_items(topics: dict[str, str], rng: random.Random) -> list[dict]:
    found = []
    for key in sorted(topics):
        for sentence in re.split(r"(?<=\.)\s+", " ".join(topics[key].split())):
            m = re.fullmatch(r"([A-Z][A-Za-z ,']{30,150}) ([a-z]{4,12})\.", sentence)
            if m:
                found.append({"context": m.group(1), "target": " " + m.group(2)})
    rng.shuffle(found)
    return found[:ITEMS]


def main() -> None:
    from pydoc_data.topics import topics

    OUT.mkdir(parents=True, exist_ok=True)
    for name, make in (("dtlab_next_line", next_line_items), ("dtlab_cloze", cloze_items)):
        items = make(topics, random.Random(0))
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        print(f"{name}: {len(items)} items")


if __name__ == "__main__":
    main()
