"""Which files make a corpus, the documents they hold, and which documents are held out.

A corpus is `data.corpus`: "embedded" (the Shakespeare and Milton texts shipped in
`data/corpus/`), "embedded:NAME" (another file shipped there, `data/corpus/NAME.jsonl.xz`: the
fine-tuning task), a directory (searched recursively), a single file, or a glob (`**` spans
folders); any of them may be on gs:// (paths.py). Files are taken in sorted path order, and
documents in file order, so the document sequence (and with it the held-out split, the last
documents) is fixed by the files alone. Hidden (dot) files and folders are not part of a corpus.

Documents by format:
  .txt      the whole file is one document
  .jsonl    one JSON object a line; its `data.text_field` string is one document
  .parquet  one row a document, from the `data.text_field` column
  .txt.xz / .jsonl.xz  the same, xz-compressed (the embedded corpus is one .jsonl.xz)
Documents that are empty or only whitespace are skipped; everything else is kept verbatim.

A corpus is identified by its files' sha256. Hashing a large corpus on every start would cost a
full read, so `file_hashes` records each file's version (size and mtime; on gs:// the object's
generation and crc32c) beside its hash in the cache, and rehashes only files whose version changed.
"""

import dataclasses
import hashlib
import json
import lzma
import math
from collections.abc import Iterator
from pathlib import Path

from etils import epath

from heft.data import paths
from heft.data.errors import DataError

EMBEDDED = "embedded"
SUFFIXES = (".txt", ".jsonl", ".parquet", ".txt.xz", ".jsonl.xz")
_FORMATS = ".txt/.jsonl/.parquet"


def embedded_path(name: str | None = None) -> Path:
    """The embedded corpus: one .jsonl.xz of documents with a `text` field (see corpus/SOURCE.md);
    or, given a name, the embedded file corpus/NAME.jsonl.xz."""
    return Path(__file__).parent / "corpus" / f"{name or 'shakespeare_milton'}.jsonl.xz"


def _embedded_file(corpus: str) -> dict[str, dict]:
    """{path: version} of `data.corpus="embedded:NAME"`."""
    name = corpus[len(EMBEDDED) + 1:]
    path = embedded_path(name)
    if not name or "/" in name or not path.is_file():
        known = sorted(p.name[: -len(".jsonl.xz")] for p in embedded_path().parent.glob("*.jsonl.xz"))
        raise DataError(f"data.corpus={corpus!r} names no embedded file; choose one of "
                        f"{', '.join(f'embedded:{k}' for k in known)}")
    return {str(path): paths.info(paths.path(path))}


@dataclasses.dataclass(frozen=True)
class Source:
    """One file of a corpus, as scanned: its content hash and what it holds."""

    path: str
    sha256: str
    bytes: int  # size of the file
    documents: int  # non-empty documents in it
    text_bytes: int  # UTF-8 bytes of those documents


def _suffix(path: str) -> str | None:
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if path.endswith(s)), None)


def _no_bucket(corpus: str) -> bool:
    return paths.is_gcs(corpus) and not paths.path(f"gs://{paths.bucket(corpus)}").exists()


def _missing(corpus: str, where: str) -> DataError:
    if _no_bucket(corpus):
        return DataError(f"{where}: the bucket gs://{paths.bucket(corpus)} does not exist; fix the path or create the bucket")
    return DataError(f"{where} does not exist; pass a directory or glob of {_FORMATS} files")


def find(corpus: str) -> dict[str, dict]:
    """The files of `data.corpus`, sorted by path, each with its version (paths.version).

    Raises DataError if there are none.
    """
    if corpus == EMBEDDED:
        return {str(embedded_path()): paths.info(paths.path(embedded_path()))}
    if corpus.startswith(EMBEDDED + ":"):
        return _embedded_file(corpus)
    where = f"data.corpus={corpus!r}"
    if paths.GLOB_CHARS & set(corpus):
        try:
            matches = paths.glob(corpus)
        except FileNotFoundError:
            matches = {}
        if not matches:
            if _no_bucket(corpus):
                raise _missing(corpus, where)  # says which bucket
            raise DataError(f"{where} matches no files; pass a directory or glob of {_FORMATS} files")
        for p in matches:
            if _suffix(p) is None:
                raise DataError(f"{where} matches {p}, which is not a {_FORMATS} file; narrow the glob")
        return matches
    p = paths.path(corpus)
    if p.is_file():
        if _suffix(corpus) is None:
            raise DataError(f"{where} is not a {_FORMATS} file; pass one, or a directory or glob of them")
        return {str(p): paths.info(p)}
    if p.is_dir():
        files = {name: v for name, v in paths.files_under(p).items() if _suffix(name)}
        if not files:
            raise DataError(f"{where} is an empty corpus: it holds no {_FORMATS} files; add some")
        return files
    raise _missing(corpus, where)


def resolve(corpus: str) -> list[str]:
    """The files of `data.corpus`, sorted by path. Raises DataError if there are none."""
    return list(find(corpus))


def _open_binary(path: str):
    f = paths.path(path).open("rb")
    return lzma.open(f, "rb") if path.endswith(".xz") else f


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where} is not UTF-8 text (invalid byte at offset {e.start}); "
            f"convert it to UTF-8 (e.g. iconv -t UTF-8) or remove it from data.corpus"
        ) from None


def _kept(text: str) -> bool:
    return bool(text.strip())


def json_lines(path: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed object) for every non-blank line of a .jsonl or .jsonl.xz file."""
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode(raw, f"{path}:{lineno}")
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove the line") from None


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    for lineno, record in json_lines(path):
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(
                f"{path}:{lineno} has no {text_field!r} field; "
                f"set data.text_field to the field that holds the text"
            )
        text = record[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{lineno} field {text_field!r} is a {type(text).__name__}, not a string; "
                f"set data.text_field to the field that holds the text"
            )
        if _kept(text):
            yield text


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # only corpora with parquet files pay for the import

    try:
        f = pq.ParquetFile(paths.path(path).open("rb"))
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path} is not a readable parquet file ({e}); fix or remove it") from None
    names = f.schema_arrow.names
    if text_field not in names:
        raise DataError(
            f"{path} has no column {text_field!r} (it has {names}); "
            f"set data.text_field to the column that holds the text"
        )
    for batch in f.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if isinstance(text, bytes):
                text = _decode(text, f"{path} column {text_field!r}")
            if not isinstance(text, str):
                raise DataError(
                    f"{path} column {text_field!r} holds {type(text).__name__}, not strings; "
                    f"set data.text_field to the column that holds the text"
                )
            if _kept(text):
                yield text


def documents(path: str, text_field: str) -> Iterator[str]:
    """The non-empty documents of one corpus file, in file order."""
    suffix = _suffix(path)
    if path == str(embedded_path()):
        text_field = "text"  # the embedded corpus's own field, whatever the user's data.text_field
    if suffix in (".txt", ".txt.xz"):
        with _open_binary(path) as f:
            text = _decode(f.read(), path)
        if _kept(text):
            yield text
    elif suffix in (".jsonl", ".jsonl.xz"):
        yield from _jsonl_documents(path, text_field)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, text_field)
    else:
        raise DataError(f"{path} is not a {_FORMATS} file; remove it from data.corpus")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with paths.path(path).open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(files: dict[str, dict], record: epath.Path | None) -> list[str]:
    """The sha256 of each file of `find()`, read from `record` (a JSON file in the cache) for files
    whose version is the one recorded, computed (and recorded) for the others.

    Args:
      files: {path: version} from `find`.
      record: where the hashes of this corpus are kept; None to hash every file.
    """
    known = {}
    if record is not None and record.exists():
        try:
            known = json.loads(record.read_bytes())
        except (ValueError, OSError):  # damaged (e.g. a disk filled up): hash again
            known = {}
    hashes, fresh = [], {}
    for path, v in files.items():
        entry = known.get(path)
        if entry is None or entry.get("version") != v:
            entry = {"version": v, "sha256": file_sha256(path)}
        hashes.append(entry["sha256"])
        fresh[path] = entry
    if record is not None and fresh != known:
        paths.write_bytes(record, (json.dumps(fresh, sort_keys=True) + "\n").encode())
    return hashes


def scan(files: dict[str, dict] | list[str], text_field: str, hashes: list[str] | None = None, keep_bytes: int = 0):
    """Reads every file once, so bad input fails before any slow work starts.

    Args:
      files: from `find` ({path: version}), or paths from `resolve`.
      hashes: their sha256, if already computed.
      keep_bytes: return the documents too if they total at most this many bytes, so that a small
        corpus is read once rather than once per pass.
    Returns:
      (sources, documents or None).
    Raises DataError on the first bad file, or if the files hold no document at all.
    """
    if not isinstance(files, dict):
        files = {p: paths.info(paths.path(p)) for p in files}
    sources, kept, total = [], [], 0
    for i, (path, version) in enumerate(files.items()):
        n = size = 0
        for text in documents(path, text_field):
            n += 1
            size += len(text.encode("utf-8"))
            if kept is not None:
                kept.append(text)
        total += size
        if kept is not None and total > keep_bytes:
            kept = None  # too large to hold: later passes read the files again
        digest = hashes[i] if hashes else file_sha256(path)
        sources.append(Source(path, digest, version["size"], n, size))
    if not any(s.documents for s in sources):
        names = ", ".join(s.path for s in sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise DataError(f"the corpus is empty: {names} hold no non-empty document; add text to data.corpus")
    return sources, kept


def heldout_count(n_documents: int, fraction: float) -> int:
    """How many of the last documents are held out: ceil(fraction * n), at least one if fraction > 0."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"data.heldout_fraction={fraction} is outside [0, 1); pick e.g. 0.05")
    if fraction == 0.0:
        return 0
    n = max(1, math.ceil(fraction * n_documents - 1e-9))  # the epsilon keeps 0.05 * 100 at 5
    if n >= n_documents:
        raise DataError(
            f"the corpus has {n_documents} document(s), too few to hold out "
            f"data.heldout_fraction={fraction} and still train; add documents or set data.heldout_fraction=0"
        )
    return n

