"""How `data/corpus/milton_next_line.jsonl.xz`, the embedded fine-tuning task, was built from the
embedded corpus; run again to rebuild it (offline: it reads only the shipped corpus).

    python -m heft.data.next_line

The task: given three lines of Paradise Lost, write the next one, and stop. Each example is
`{"prompt": three lines, each ending in "\\n", "completion": the fourth line}`; every second line
of the poem is a completion (so every line is in at most two examples, once as the answer). Verse
lines are the poem's lines with at least one lower-case letter (headings like "BOOK III" and
"THE END." are left out), stripped of the spaces around them, Books I to X in order. With
`data.format=prompt_completion` the loss falls on the completion and the end of text after it
(data/pairs.py), so a model learns both Milton's line and where it ends; the last
`data.heldout_fraction` of the examples (the end of Book X) are held out.
"""

import json
import lzma
import os
import re

from heft.data import corpus

PROMPT_LINES = 3
STRIDE = 2
OUT = corpus.embedded_path("milton_next_line")


def verse_lines() -> list[str]:
    """Paradise Lost's verse lines, Book I to Book X, from the embedded corpus."""
    books = {}
    for _, record in corpus.json_lines(str(corpus.embedded_path())):
        work, piece = record["title"].rsplit(" ", 1)  # e.g. "paradise_lost_(no_introduction) 3/10"
        if work.startswith("paradise_lost"):
            books[int(piece.split("/")[0])] = record["text"]
    return [line.strip() for _, text in sorted(books.items()) for line in text.splitlines() if re.search(r"[a-z]", line)]


def examples(lines: list[str]) -> list[dict]:
    return [{"prompt": "".join(f"{line}\n" for line in lines[i - PROMPT_LINES:i]), "completion": lines[i]}
            for i in range(PROMPT_LINES, len(lines), STRIDE)]


def main() -> None:
    pairs = examples(verse_lines())
    with lzma.open(OUT, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    print(f"wrote {len(pairs)} examples to {OUT} ({os.path.getsize(OUT) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
