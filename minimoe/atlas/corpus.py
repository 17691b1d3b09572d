"""What an atlas reads: the documents of a corpus, each with a domain, cut into deterministic shards.

Inputs are text files, folders, JSONL files and Parquet files:

* a folder stands for the files under it that match ``glob`` (sorted by path), each one
  document; a file's domain is the first folder under the given root (the root's own name for
  the files directly in it), unless the input has a ``domain`` of its own;
* a text file is one document (UTF-8), its domain the input's ``domain`` or its folder's name;
* a ``.jsonl`` file holds one document per line, a JSON object whose ``text_field`` is the
  text and whose ``domain_field`` (when present) names the domain; blank lines are skipped;
* a ``.parquet`` file holds one document per row, the same two columns (pyarrow reads it).

A :class:`Plan` numbers every document in that order and cuts the sequence into shards of
``shard_size`` documents: the shards depend only on the inputs and the shard size, never on the
engine or the number of workers.  Each document has a key (``root/relative/path``, plus
``:line`` or ``:row``) that names it in errors and seeds its sample hashes.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..errors import MinimoeError

PARQUET_BATCH = 1024  # rows read at a time


@dataclass(frozen=True)
class Source:
    """One file of the corpus: ``items`` documents (1 for a text file; lines or rows otherwise)."""

    path: str
    kind: str  # "text", "jsonl" or "parquet"
    key: str  # its stable name: the input root's name and the path under it
    domain: str  # the domain of its documents (JSONL and Parquet: unless a record names its own)
    items: int


@dataclass(frozen=True)
class Document:
    key: str
    domain: str
    text: str


@dataclass(frozen=True)
class Shard:
    """Documents ``start .. stop - 1`` of the plan's sequence."""

    index: int
    start: int
    stop: int


@dataclass(frozen=True)
class Plan:
    sources: tuple[Source, ...]
    shard_size: int
    text_field: str = "text"
    domain_field: str = "domain"

    @classmethod
    def build(cls, inputs: list[str | Path], domains: list[str] | None = None, glob: str = "*",
              shard_size: int = 16, text_field: str = "text", domain_field: str = "domain",
              skip_unreadable: bool = False) -> "Plan":
        """The plan of ``inputs`` (``domains``: none, one for all, or one per input); MinimoeError for a missing
        input, a Parquet file without the text column, or nothing to read.  Unless ``skip_unreadable``, every
        document is read once here (:meth:`check`), so that a bad file or line is named before any tracing."""
        if not inputs:
            raise MinimoeError("no inputs: give text files, folders, .jsonl or .parquet files")
        if domains and len(domains) not in (1, len(inputs)):
            raise MinimoeError(f"--domain was given {len(domains)} times for {len(inputs)} inputs: give it once "
                               "(for all of them) or once per input, in order")
        if not (isinstance(shard_size, int) and shard_size >= 1):
            raise MinimoeError(f"the shard size must be a positive number of documents, got {shard_size!r}")
        sources = []
        for number, spec in enumerate(inputs):
            domain = (domains[0] if len(domains) == 1 else domains[number]) if domains else None
            sources += expand(Path(spec), domain, glob, text_field)
        plan = cls(tuple(sources), shard_size, text_field, domain_field)
        if not skip_unreadable:
            plan.check()
        if plan.num_documents == 0:
            raise MinimoeError(f"the corpus is empty: no documents in {', '.join(map(str, inputs))}"
                               + (f" (files matching {glob!r})" if glob != "*" else ""))
        return plan

    def check(self) -> None:
        """Read every document once: MinimoeError for the first that cannot be read, naming its file and line."""
        for shard in self.shards():
            for _ in self.documents(shard):
                pass

    @property
    def num_documents(self) -> int:
        return sum(source.items for source in self.sources)

    def shards(self) -> list[Shard]:
        total = self.num_documents
        return [Shard(i, start, min(start + self.shard_size, total))
                for i, start in enumerate(range(0, total, self.shard_size))]

    def describe(self) -> dict:
        """The plan as JSON (what a resumed run must match)."""
        return {"sources": [asdict(s) for s in self.sources], "shard_size": self.shard_size,
                "text_field": self.text_field, "domain_field": self.domain_field}

    def documents(self, shard: Shard, skip_unreadable: bool = False, skipped: list[str] | None = None
                  ) -> Iterator[Document]:
        """The shard's documents, in order.  A file that cannot be read raises MinimoeError naming it (and the
        line or row), or with ``skip_unreadable`` is left out and named in ``skipped``."""
        first = 0
        for source in self.sources:
            lo, hi = max(shard.start - first, 0), min(shard.stop - first, source.items)
            first += source.items
            if lo >= hi:
                continue
            skip = skipped.append if skip_unreadable and skipped is not None else None
            try:
                yield from read_source(source, lo, hi, self.text_field, self.domain_field, skip)
            except MinimoeError as error:
                if skip is None:
                    raise
                skip(str(error))


def expand(path: Path, domain: str | None, glob: str, text_field: str) -> list[Source]:
    """The sources one input stands for."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and matches(p.name, glob))
        root = path.resolve().name or "corpus"
        return [source_of(file, f"{root}/{file.relative_to(path).as_posix()}",
                          domain or (file.relative_to(path).parts[0] if len(file.relative_to(path).parts) > 1
                                     else root), text_field)
                for file in files]
    if path.is_file():
        return [source_of(path, path.name, domain or path.resolve().parent.name or "corpus", text_field)]
    raise MinimoeError(f"{path}: no such file or folder")


def matches(name: str, glob: str) -> bool:
    """Whether a file name matches one of the comma-separated patterns of ``glob``."""
    return any(fnmatch.fnmatch(name, pattern.strip()) for pattern in glob.split(","))


def source_of(path: Path, key: str, domain: str, text_field: str) -> Source:
    if path.suffix == ".jsonl":
        return Source(str(path), "jsonl", key, domain, count_lines(path))
    if path.suffix == ".parquet":
        return Source(str(path), "parquet", key, domain, parquet_rows(path, text_field))
    return Source(str(path), "text", key, domain, 1)


def count_lines(path: Path) -> int:
    """Lines of a file (a last line without a newline counts)."""
    try:
        lines, last = 0, b"\n"
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
        return lines + (last != b"\n")
    except OSError as exc:
        raise MinimoeError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def open_parquet(path: Path | str):
    """A ``pyarrow.parquet.ParquetFile``; MinimoeError saying how to install pyarrow, or why the file is bad."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MinimoeError(f"{path}: reading Parquet needs pyarrow: pip install 'minimoe[parquet]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError both mean an unreadable file
        raise MinimoeError(f"{path}: not a readable Parquet file ({exc})") from None


def parquet_rows(path: Path, text_field: str) -> int:
    parquet = open_parquet(path)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise MinimoeError(f"{path}: no column {text_field!r} (its columns: {', '.join(columns)}); "
                           "name the text column with --text-field")
    return parquet.metadata.num_rows


def read_source(source: Source, lo: int, hi: int, text_field: str, domain_field: str, skip=None
                ) -> Iterator[Document]:
    """Documents ``lo .. hi - 1`` of one source; ``skip(message)``, if given, takes a bad line or row's error
    instead of raising it (the file's other records are still read)."""
    if source.kind == "text":
        yield Document(source.key, source.domain, read_text_file(source.path))
        return
    records = read_jsonl(source, lo, hi) if source.kind == "jsonl" else read_parquet(source, lo, hi, text_field,
                                                                                      domain_field)
    for where, key, record in records:
        try:
            yield record_document(record, where, key, source.domain, text_field, domain_field)
        except MinimoeError as error:
            if skip is None:
                raise
            skip(str(error))


def read_text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MinimoeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise MinimoeError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def read_jsonl(source: Source, lo: int, hi: int) -> Iterator[tuple[str, str, object]]:
    """(where, key, record) of lines ``lo .. hi - 1``; a line that is not JSON is a MinimoeError record."""
    try:
        with open(source.path, "rb") as handle:
            for number, raw in enumerate(handle):
                if number >= hi:
                    break
                if number < lo or not raw.strip():
                    continue
                where = f"{source.path}:{number + 1}"  # line numbers from 1, as editors show them
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    record = MinimoeError(f"{where}: not a JSON line ({exc})")
                yield where, f"{source.key}:{number + 1}", record
    except OSError as exc:
        raise MinimoeError(f"{source.path}: cannot read it ({exc.strerror or exc})") from None


def read_parquet(source: Source, lo: int, hi: int, text_field: str, domain_field: str
                 ) -> Iterator[tuple[str, str, object]]:
    """(where, key, record) of rows ``lo .. hi - 1``."""
    parquet = open_parquet(source.path)
    columns = [c for c in (text_field, domain_field) if c in parquet.schema_arrow.names]
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, columns=columns):
        if row + batch.num_rows > lo:
            for offset, record in enumerate(batch.to_pylist()):
                number = row + offset
                if lo <= number < hi:
                    yield f"{source.path}: row {number}", f"{source.key}:{number}", record
        row += batch.num_rows
        if row >= hi:
            break


def record_document(record, where: str, key: str, domain: str, text_field: str, domain_field: str) -> Document:
    """A JSONL line's or Parquet row's document; MinimoeError naming ``where`` if it has no text."""
    if isinstance(record, MinimoeError):
        raise record
    if not isinstance(record, dict):
        raise MinimoeError(f"{where}: a JSON {type(record).__name__}, not an object with a {text_field!r} field")
    if text_field not in record:
        raise MinimoeError(f"{where}: no {text_field!r} field (its fields: {', '.join(map(str, record)) or 'none'}); "
                           "name the text field with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise MinimoeError(f"{where}: the {text_field!r} field is a {type(text).__name__}, not a string")
    own = record.get(domain_field)
    return Document(key, domain if own is None else str(own), text)
