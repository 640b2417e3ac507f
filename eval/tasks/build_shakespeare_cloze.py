"""How `heft_shakespeare_cloze.jsonl` was built; run again to rebuild it (the same bytes):

    python eval/tasks/build_shakespeare_cloze.py

Which of four lines continues this speech? From the held-out documents of the embedded corpus
(the last 5%: acts of nine plays, never trained on by `heft train`'s default split), each item
takes a speech of verse (a speaker's name line, then at least four lines), cuts it after its
second to sixth line, and offers the next line as written and three shufflings of its words. The
four choices hold the same words, so length and vocabulary give nothing away: only knowing how
English verse runs does. A model that has learned nothing scores 25%.
"""

import hashlib
import json
import os
import random
import re

from heft.data import corpus

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "heft_shakespeare_cloze.jsonl")
ITEMS = 500
SEED = 0
HELDOUT_FRACTION = 0.05  # base config's data.heldout_fraction
SPEAKER = re.compile(r"^[A-Z][A-Z .'\-]+\.$")  # "DUKE." / "FIRST LORD." at the head of a speech
MAX_CONTEXT_LINES = 6


def heldout_documents() -> list[str]:
    docs = [text for path in corpus.find(corpus.EMBEDDED) for text in corpus.documents(path, "text")]
    return docs[len(docs) - corpus.heldout_count(len(docs), HELDOUT_FRACTION):]


def speeches(text: str) -> list[list[str]]:
    """Blocks separated by blank lines that open with a speaker's name and hold >= 4 lines of text."""
    out = []
    for block in text.split("\n\n"):
        lines = [line.rstrip() for line in block.strip("\n").split("\n")]
        if len(lines) >= 5 and SPEAKER.match(lines[0].strip()) and all(len(line.strip()) > 10 for line in lines[1:]):
            out.append(lines)
    return out


def shufflings(line: str, rng: random.Random, n: int = 3) -> list[str] | None:
    """n different orders of the line's words, none the original; None if the line has too few."""
    words = line.split()
    if len(words) < 4:
        return None
    seen, out = {" ".join(words)}, []
    for _ in range(100):
        order = words[:]
        rng.shuffle(order)
        text = " ".join(order)
        if text not in seen:
            seen.add(text)
            out.append(text)
            if len(out) == n:
                return out
    return None


def build() -> list[dict]:
    rng = random.Random(SEED)
    candidates = [s for doc in heldout_documents() for s in speeches(doc)]
    rng.shuffle(candidates)
    items = []
    for speech in candidates:
        if len(items) == ITEMS:
            break
        k = rng.randint(2, min(MAX_CONTEXT_LINES, len(speech) - 2))  # lines of the speech before the answer
        answer = " ".join(speech[k + 1].split())
        wrong = shufflings(answer, rng)
        if wrong is None:
            continue
        choices = wrong + [answer]
        rng.shuffle(choices)
        items.append({"context": "\n".join(speech[: k + 1]) + "\n", "choices": choices,
                      "label": choices.index(answer)})
    return items


def main() -> None:
    items = build()
    with open(OUT, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    digest = hashlib.sha256(open(OUT, "rb").read()).hexdigest()[:16]
    print(f"wrote {len(items)} items to {OUT} (sha256 {digest}...)")


if __name__ == "__main__":
    main()
