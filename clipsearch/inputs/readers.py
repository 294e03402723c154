"""Reader stage: turn inputs into a deterministic stream of `Record`s.

Formats (detected, or forced with `--format`):

* ``tsv``   EasyNLP's layout, ``text<TAB>base64image`` per line (urlsafe or standard
  base64). ``--input-schema`` names the columns, e.g. ``id,text,image`` or EasyNLP's
  ``text:str:1,image:str:1``; ``_`` skips a column. Without a schema: 1 column is
  texts or base64 images (told apart by the first line), 2 are ``text,image``, 3 are
  ``id,text,image``.
* ``dir``   a directory of image files, recursive; id = path relative to the directory.
* ``jsonl`` records ``{"id", "image": path or base64, "text", "metadata": {...}}``;
  a relative image path is taken relative to the JSONL file.
* ``parquet`` one row per record: ``id`` (or ``key``), ``text`` (or ``caption``), ``image``
  (or ``jpg`` / ``png`` / ``webp``: the file's bytes, or a base64 string or path) and
  ``metadata`` (a struct or JSON text); every other scalar column goes into the metadata.
  A span reads only the row groups it covers.
* ``webdataset`` a ``.tar`` shard of samples ``KEY.jpg`` (png, webp, ...) with ``KEY.txt``
  (the caption) and ``KEY.json`` (metadata), as img2dataset writes them; id = KEY.

An input, and an image path inside one, may be an fsspec URL (``s3://``, ``gs://``,
``az://``, ``hf://``, ``memory://``, ...; the filesystem's package installed, such as s3fs),
read through universal_pathlib's `UPath`; everything else is a local path.

Readers do no decoding: bad base64 or a corrupt file is found by the encoder, which
reports it with the record's `source` (``file:line`` or path).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import orjson
from upath import UPath

from clipsearch.inputs import embeddings

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FORMATS = ("auto", "tsv", "dir", "jsonl", "parquet", "webdataset", "embeddings")
_IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp", "image_bytes")
_TEXT_COLUMNS = ("text", "caption", "txt")
_ID_COLUMNS = ("id", "key")
NO_CONTENT = "row has neither a text nor an image column with a value"
# Parquet columns of precomputed vectors (lists of floats), and the index each goes to
_VECTOR_COLUMNS = {"image_embedding": "image", "img_emb": "image", "embedding": "image",
                   "text_embedding": "text", "text_emb": "text"}
_COLUMNS = {"id", "text", "image", "_"}

InputPath = Path | UPath  # a local path, or an fsspec URL


def is_url(location: str) -> bool:
    head, sep, _ = location.partition("://")
    return bool(sep) and head.replace("+", "").replace("-", "").replace(".", "").isalnum()


def input_path(location: str | Path) -> InputPath:
    """`location` as a path: a `UPath` for an fsspec URL, else a local `Path`."""
    if isinstance(location, str) and is_url(location):
        return UPath(location)
    return Path(location)


def open_input(path: InputPath | str, mode: str = "rb", **kwargs: Any) -> IO[Any]:
    """Open a local file or an fsspec URL (read-ahead `buffering` bytes for binary reads)."""
    path = input_path(path) if isinstance(path, str) else path
    if isinstance(path, Path):
        return open(path, mode, **kwargs)
    buffering = kwargs.pop("buffering", None)
    return path.open(mode, **({"block_size": buffering} if buffering and "b" in mode else {}), **kwargs)


@dataclass
class Record:
    id: str
    source: str  # where it came from, for error reports: "corpus.tsv:17" or a path
    text: str | None = None
    image_b64: str | None = None
    image_path: str | None = None
    image_bytes: bytes | None = None  # the image file itself (Parquet, WebDataset)
    metadata: dict[str, Any] = field(default_factory=dict)
    image_vector: Any = None  # precomputed (an embeddings folder): L2-normalized float32, no model pass
    text_vector: Any = None
    error: str | None = None  # a problem the reader already found (bad JSON, missing column)


class InputError(ValueError):
    """An input that cannot be read at all (missing file, unknown format, bad schema)."""


@dataclass(frozen=True)
class Span:
    """`count` consecutive lines (or image files) of input number `input`, from its line
    (file) `first` (0-based), which starts at byte `offset`: the builder's unit of work and
    of resume. A worker reads a span by seeking to it, without reading what comes before."""

    input: int
    first: int
    count: int
    offset: int = 0


def detect_format(path: InputPath) -> str:
    if embeddings.is_embeddings_dir(path):
        return "embeddings"
    if path.is_dir():
        return "dir"
    if not path.is_file():
        raise InputError(f"input {path} does not exist")
    if path.suffix.lower() in {".jsonl", ".ndjson"}:
        return "jsonl"
    if path.suffix.lower() in {".parquet", ".pq"}:
        return "parquet"
    if path.suffix.lower() == ".tar":
        return "webdataset"
    if path.suffix.lower() == ".npy":
        return "embeddings"
    if path.suffix.lower() in {".tsv", ".txt", ".csv"}:
        return "tsv"
    with open_input(path) as f:
        head = f.read(1).lstrip()
    return "jsonl" if head.startswith(b"{") else "tsv"


def parse_schema(schema: str) -> list[str]:
    """`id,text,image` or EasyNLP's `text:str:1,image:str:1` -> column names."""
    names = [part.split(":", 1)[0].strip().lower() for part in schema.split(",") if part.strip()]
    aliases = {"img": "image", "base64": "image", "image_b64": "image", "caption": "text", "skip": "_"}
    names = [aliases.get(n, n) for n in names]
    bad = [n for n in names if n not in _COLUMNS]
    if bad or not names or not ({"text", "image"} & set(names)):
        raise InputError(f"bad --input-schema {schema!r}: columns are id, text, image or _ (skip)")
    if len([n for n in names if n != "_"]) != len({n for n in names if n != "_"}):
        raise InputError(f"bad --input-schema {schema!r}: a column is named twice")
    return names


def _looks_like_base64_image(value: str) -> bool:
    import base64
    import binascii

    v = value.strip()
    if v.startswith("data:image/"):
        return True
    if len(v) < 64 or " " in v:
        return False
    head = v[:64].replace("-", "+").replace("_", "/")
    try:
        raw = base64.b64decode(head[: len(head) // 4 * 4], validate=True)
    except (binascii.Error, ValueError):
        return False
    signatures = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
    return raw.startswith(signatures)


def _default_schema(path: InputPath) -> list[str]:
    with open_input(path, "r", encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) == 1:
                return ["image"] if _looks_like_base64_image(cols[0]) else ["text"]
            if named := default_columns(len(cols)):
                return named
            raise InputError(f"{path}: {len(cols)} columns; give --input-schema (columns: id, text, image, _)")
    return ["text"]


_SCAN_CHUNK = 4 << 20  # bytes per numpy pass when cutting files into spans
_READ_BUFFER = 4 << 20  # bytes; lines of 100-200 kB read far slower through the default 8 kB


def read_tsv(path: InputPath, schema: list[str] | None, id_prefix: str, span: Span | None = None) -> Iterator[Record]:
    # A line is mostly one 100-200 kB base64 image, so lines are read as bytes through a
    # large buffer. Only the id and text columns are decoded as UTF-8; the image column as Latin-1, a plain copy that
    # keeps any non-ASCII byte for decode_base64 to reject. Lines end at "\n" (a "\r"
    # before it is dropped).
    columns = schema or _default_schema(path)
    with open_input(path, "rb", buffering=_READ_BUFFER) as f:
        for line_no, line in _numbered_lines(f, span):
            if not line or line.isspace():  # stops at the first other byte: no copy of the line
                continue
            if line_no == 1:
                line = strip_bom(line)
            yield tsv_record(line, columns, f"{path.name}:{line_no}", f"{id_prefix}{line_no}")


def tsv_record(line: bytes, columns: list[str], source: str, default_id: str) -> Record:
    """One TSV line as a Record, its columns named by `columns` (a wrong count is the record's error)."""
    cols = _columns(line)
    rec = Record(id=default_id, source=source)
    if len(cols) != len(columns):
        rec.error = f"{len(cols)} columns, expected {len(columns)} ({','.join(columns)})"
        return rec
    for name, value in zip(columns, cols, strict=True):
        if name == "id":
            rec.id = str(value, "utf-8", "replace").strip() or rec.id
        elif name == "text":
            rec.text = str(value, "utf-8", "replace")
        elif name == "image":
            rec.image_b64 = str(value, "latin-1").strip()
    return rec


def strip_bom(line: bytes) -> bytes:
    """The first line of a file without a UTF-8 byte order mark (spreadsheet exports start with one)."""
    return line[3:] if line.startswith(b"\xef\xbb\xbf") else line


def default_columns(count: int) -> list[str] | None:
    """The columns of a line of `count` columns when no schema names them (1 column: None)."""
    return {2: ["text", "image"], 3: ["id", "text", "image"]}.get(count)


def column_count(line: bytes) -> int:
    return len(_columns(line))


def _columns(line: bytes) -> list[memoryview]:
    """The tab-separated columns of `line` without its line ending, as views: each column
    is copied once, when it is decoded, instead of also by a split and a strip."""
    end = len(line)
    while end and line[end - 1] in b"\r\n":
        end -= 1
    view = memoryview(line)
    cols, start = [], 0
    while (tab := line.find(b"\t", start, end)) >= 0:
        cols.append(view[start:tab])
        start = tab + 1
    cols.append(view[start:end])
    return cols


def _numbered_lines(f: IO[bytes], span: Span | None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of the whole file, or of `span` only."""
    if span is None:
        return enumerate(f, start=1)
    f.seek(span.offset)
    return enumerate(itertools.islice(f, span.count), start=span.first + 1)


def _files(path: InputPath) -> dict[str, dict[str, Any]]:
    """Every file under a directory, recursively: its path relative to the directory (posix)
    and its size and modification stamp, in one listing (one request per page on object
    stores, not one per file)."""
    if isinstance(path, Path):
        return {p.relative_to(path).as_posix(): {"size": (st := p.stat()).st_size, "stamp": st.st_mtime_ns}
                for p in path.rglob("*") if p.is_file()}
    root = path.path.rstrip("/")
    found = path.fs.find(root, detail=True)
    return {name[len(root):].lstrip("/"): {"size": int(info.get("size") or 0), "stamp": _stamp(info)}
            for name, info in found.items() if info.get("type") == "file"}


def _stamp(info: dict[str, Any]) -> str:
    """What identifies a remote file's version: its ETag, else its modification time."""
    for key in ("ETag", "etag", "md5Hash", "generation", "LastModified", "mtime", "updated", "last_modified",
                "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _list_image_files(path: InputPath) -> tuple[str, ...]:
    """The image files under a directory: their paths relative to it, sorted."""
    return tuple(sorted(rel for rel in _files(path) if PurePosixPath(rel).suffix.lower() in IMAGE_SUFFIXES
                        and not PurePosixPath(rel).name.startswith(".")))


# A build reads many spans of one directory (in each encoder process): list it once per
# build. `plan_spans` clears it, so a later build in the same process lists afresh.
_span_files = functools.lru_cache(maxsize=4)(_list_image_files)


def read_dir(path: InputPath, span: Span | None = None) -> Iterator[Record]:
    files = _list_image_files(path) if span is None else _span_files(path)[span.first : span.first + span.count]
    for rel in files:
        p = str(path.joinpath(rel))
        yield Record(id=rel, source=p, image_path=p, metadata={"path": rel})


def read_jsonl(path: InputPath, id_prefix: str, span: Span | None = None) -> Iterator[Record]:
    with open_input(path, "rb", buffering=_READ_BUFFER) as f:
        for line_no, raw in _numbered_lines(f, span):
            if not raw.strip():
                continue
            source = f"{path.name}:{line_no}"
            rec = Record(id=f"{id_prefix}{line_no}", source=source)
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                rec.error = f"invalid JSON ({exc})"
                yield rec
                continue
            if not isinstance(obj, dict):
                rec.error = "a JSONL record must be an object"
                yield rec
                continue
            if obj.get("id") is not None:
                rec.id = str(obj["id"])
            text, image, meta = obj.get("text"), obj.get("image"), obj.get("metadata")
            if text is not None and not isinstance(text, str):
                rec.error = "'text' must be a string"
            elif image is not None and not isinstance(image, str):
                rec.error = "'image' must be a path or a base64 string"
            elif meta is not None and not isinstance(meta, dict):
                rec.error = "'metadata' must be an object"
            elif text is None and image is None:
                rec.error = "record has neither 'text' nor 'image'"
            rec.text = text
            rec.metadata = dict(meta or {})
            if isinstance(image, str):
                _set_image_text(rec, image, path.parent)
            yield rec


def _set_image_text(rec: Record, value: str, base: InputPath) -> None:
    """An image given as text: base64 (or a data: URI), else a path or URL, relative to `base`."""
    if _looks_like_base64_image(value) or len(value) > 4096:
        rec.image_b64 = value
    elif is_url(value) or Path(value).is_absolute():
        rec.image_path = value
    else:
        rec.image_path = str(base.joinpath(value))


def _embedding_rows(path: InputPath) -> int:
    try:
        return embeddings.count(Path(str(path)))  # input_kind checked: a local folder
    except embeddings.EmbeddingsError as exc:
        raise InputError(str(exc)) from None


def _parquet_rows(path: InputPath) -> int:
    import pyarrow.parquet as pq

    try:
        with open_input(path) as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"{path}: not a readable Parquet file ({exc})") from None


def read_parquet(path: InputPath, id_prefix: str, span: Span | None = None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    with open_input(path) as f:
        yield from _parquet_records(pq.ParquetFile(f), path, id_prefix, span)


def _parquet_records(pf: Any, path: InputPath, id_prefix: str, span: Span | None) -> Iterator[Record]:
    first = 0 if span is None else span.first
    end = pf.metadata.num_rows if span is None else span.first + span.count
    start = 0
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        lo, hi = max(first, start), min(end, start + rows)
        if lo < hi:
            table = pf.read_row_group(group).slice(lo - start, hi - lo)
            for k, row in enumerate(table.to_pylist()):
                yield _parquet_record(path, id_prefix, lo + k + 1, row)
        start += rows
        if start >= end:
            break


def _parquet_record(path: InputPath, id_prefix: str, number: int, row: dict[str, Any]) -> Record:
    rec = Record(id=f"{id_prefix}{number}", source=f"{path.name}:row {number}")
    used: set[str] = set()
    for name in _ID_COLUMNS:
        if row.get(name) is not None:
            rec.id, used = str(row[name]), used | {name}
            break
    for name in _TEXT_COLUMNS:
        if name in row:
            used.add(name)
            if row[name] is not None:
                rec.text = str(row[name])
                break
    for name in _IMAGE_COLUMNS:
        if name in row:
            used.add(name)
            value = row[name]
            if isinstance(value, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                value = value.get("bytes") or value.get("path")
            if isinstance(value, bytes):
                rec.image_bytes = value
            elif isinstance(value, str):
                _set_image_text(rec, value, path.parent)
            if value is not None:
                break
    for name, kind in _VECTOR_COLUMNS.items():  # precomputed vectors: indexed as given, no model pass
        if row.get(name) is not None:
            used.add(name)
            try:
                vector = embeddings.unit_rows(np.asarray([row[name]], np.float32), f"{path.name}:{name}",
                                              number)[0]
            except (ValueError, embeddings.EmbeddingsError) as exc:
                raise InputError(str(exc)) from None
            setattr(rec, f"{kind}_vector", vector)
    meta = row.get("metadata")
    used.add("metadata")
    if isinstance(meta, str):
        try:
            meta = orjson.loads(meta)
        except orjson.JSONDecodeError:
            rec.error = "'metadata' is not valid JSON"
    rec.metadata = dict(meta) if isinstance(meta, dict) else {}
    for name, value in row.items():  # other scalar columns are metadata too (url, width, ...)
        if name not in used and (value is None or isinstance(value, (str, int, float, bool))):
            rec.metadata.setdefault(name, value)
    if rec.error is None and rec.text is None and rec.image_b64 is None and rec.image_path is None \
            and rec.image_bytes is None and rec.image_vector is None and rec.text_vector is None:
        rec.error = NO_CONTENT
    return rec


_WDS_IMAGE = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _wds_samples(path: InputPath) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {extension: member}) per sample of a WebDataset tar, in file order: members
    with the same key (the name up to its first dot after the last slash) form a sample."""
    import tarfile

    try:
        source = open_input(path, "rb", buffering=_READ_BUFFER)
        tar = tarfile.open(fileobj=source, mode="r:*")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as exc:
        raise InputError(f"{path}: not a readable tar file ({exc})") from None
    with source, tar:
        key, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            directory, _, name = member.name.rpartition("/")
            stem, dot, ext = name.partition(".")
            if not dot or name.startswith("."):
                continue
            k = f"{directory}/{stem}" if directory else stem
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            parts["." + ext.lower()] = (tar, member)
        if key is not None:
            yield key, parts


def _wds_count(path: InputPath) -> int:
    return sum(1 for _ in _wds_samples(path))


def read_webdataset(path: InputPath, span: Span | None = None) -> Iterator[Record]:
    samples = _wds_samples(path)
    if span is not None:
        samples = itertools.islice(samples, span.first, span.first + span.count)
    for key, parts in samples:
        rec = Record(id=key, source=f"{path.name}:{key}")

        def read(ext: str, parts: dict[str, Any] = parts) -> bytes:
            tar, member = parts[ext]
            f = tar.extractfile(member)
            return f.read() if f is not None else b""

        image_ext = next((e for e in parts if e in _WDS_IMAGE), None)
        if image_ext is not None:
            rec.image_bytes = read(image_ext)
        for ext in (".txt", ".caption", ".text"):
            if ext in parts:
                rec.text = read(ext).decode("utf-8", "replace")
                break
        if ".json" in parts:
            try:
                meta = orjson.loads(read(".json"))
                rec.metadata = meta if isinstance(meta, dict) else {"json": meta}
            except orjson.JSONDecodeError:
                rec.error = f"{key}.json is not valid JSON"
        if rec.error is None and rec.text is None and rec.image_bytes is None:
            rec.error = "sample has neither an image nor a caption"
        yield rec


def input_kind(path: InputPath, fmt: str = "auto") -> str:
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "dir" and not path.is_dir():
        raise InputError(f"{path} is not a directory")
    if kind == "embeddings" and not embeddings.is_embeddings_dir(path):
        raise InputError(f"{path} is not an embeddings folder (img_emb/, text_emb/, metadata/) or .npy file on "
                         "local disk")
    return kind


def read_inputs(inputs: Sequence[InputPath], fmt: str = "auto", schema: str | None = None) -> Iterator[Record]:
    """All records of all inputs, in a fixed order: the same as reading every span of
    `plan_spans(inputs, fmt, n)` in turn, for any n."""
    for i in range(len(inputs)):
        yield from _read(inputs, i, None, fmt, schema)


def read_span(inputs: Sequence[InputPath], span: Span, fmt: str = "auto", schema: str | None = None,
              prefix_ids: bool = False, confine: bool = False) -> Iterator[Record]:
    """The records of one span of `plan_spans(inputs, fmt, ...)`. Line ids carry their file's
    stem (`corpus:17`) with several inputs, or with `prefix_ids` (an incremental build). With
    `confine`, an image path that leads outside the input's folder is the record's error."""
    records = _read(inputs, span.input, span, fmt, schema, prefix_ids)
    return confined(records, inputs[span.input]) if confine else records


def confined(records: Iterator[Record], source: InputPath) -> Iterator[Record]:
    """`records` with every image path outside `source`'s folder (absolute, `../`, a symlink
    out, another URL or scheme) refused: for inputs written by someone the operator does not
    trust, whose paths would otherwise be read and published as thumbnails."""
    folder = source if _is_dir(source) else source.parent
    for rec in records:
        if rec.image_path is not None and rec.error is None and not _inside(rec.image_path, folder):
            rec.error = f"image path {rec.image_path[:200]!r} is outside the input's folder (--confine)"
            rec.image_path = None
        yield rec


def _is_dir(path: InputPath) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _inside(location: str, folder: InputPath) -> bool:
    if isinstance(folder, Path):  # a local input: only local paths, after resolving links and ../
        if is_url(location):
            return False
        return Path(location).resolve().is_relative_to(folder.resolve())
    if not is_url(location):
        return False
    given, root = UPath(location), folder
    if given.protocol != root.protocol or any(part in ("..", ".") for part in PurePosixPath(given.path).parts):
        return False
    return PurePosixPath(given.path).is_relative_to(PurePosixPath(root.path))


def _read(inputs: Sequence[InputPath], i: int, span: Span | None, fmt: str, schema: str | None,
          prefix_ids: bool = False) -> Iterator[Record]:
    path = inputs[i]
    kind = input_kind(path, fmt)
    columns = parse_schema(schema) if schema else None
    prefix = f"{path.stem}:" if len(inputs) > 1 or prefix_ids else ""
    if kind == "dir":
        return read_dir(path, span)
    if kind == "jsonl":
        return read_jsonl(path, prefix, span)
    if kind == "parquet":
        return read_parquet(path, prefix, span)
    if kind == "webdataset":
        return read_webdataset(path, span)
    if kind == "embeddings":
        return read_embeddings(Path(str(path)), prefix, span)  # input_kind checked: a local folder
    return read_tsv(path, columns, prefix, span)


def read_embeddings(path: Path, id_prefix: str, span: Span | None = None) -> Iterator[Record]:
    """The records of an embeddings folder (`inputs.embeddings`): each row's metadata as a
    Parquet corpus row's, with its precomputed vectors."""
    import pyarrow.parquet as pq

    try:
        folder = embeddings.parts(path)
        first, number = (0, embeddings.count(path)) if span is None else (span.first, span.count)
        for part, lo, hi, image, text in embeddings.chunks(path, first, number):
            offset = sum(folder.rows[:part])
            if folder.metadata:
                meta = folder.metadata[part]
                rows = _parquet_records(pq.ParquetFile(meta), meta, "", Span(0, lo, hi - lo))
            else:
                rows = (Record(id="", source="") for _ in range(hi - lo))
            for k, rec in enumerate(rows):
                row = offset + lo + k
                if not folder.metadata or rec.id == str(lo + k + 1):  # no id column: the row's number
                    rec.id = f"{id_prefix}{row + 1}"
                rec.source = f"{path.name}:row {row + 1}"
                if rec.error == NO_CONTENT:  # the vectors are the content
                    rec.error = None
                rec.image_vector = None if image is None else image[k]
                rec.text_vector = None if text is None else text[k]
                yield rec
    except embeddings.EmbeddingsError as exc:
        raise InputError(str(exc)) from None


def describe_inputs(inputs: Sequence[InputPath]) -> list[dict[str, Any]]:
    """Name, size and modification time (or, for a URL, its ETag or time) of each input: part
    of the resume key and the manifest."""
    out: list[dict[str, Any]] = []
    for path in inputs:
        name = str(path.resolve()) if isinstance(path, Path) else str(path)
        if path.is_dir():
            files = _files(path)
            stamps = [f["stamp"] for f in files.values()]
            out.append({"path": name, "kind": "dir", "files": len(files),
                        "bytes": sum(f["size"] for f in files.values()),
                        **({"mtime_ns": max(stamps, default=0)} if isinstance(path, Path) else
                           {"stamp": _digest(sorted(f"{k}:{v['stamp']}" for k, v in files.items()))})})
        elif path.is_file():
            if isinstance(path, Path):
                st = path.stat()
                out.append({"path": name, "kind": "file", "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
            else:
                info = path.fs.info(path.path)
                out.append({"path": name, "kind": "url", "bytes": int(info.get("size") or 0), "stamp": _stamp(info)})
        else:
            raise InputError(f"input {path} does not exist")
    return out


def _digest(parts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def plan_spans(inputs: Sequence[InputPath], fmt: str = "auto", size: int = 1024) -> list[Span]:
    """Cut every input into spans of `size` lines (image files); no span crosses two inputs.

    One pass over each file, finding line ends with numpy, records where every `size`-th
    line starts.
    """
    _span_files.cache_clear()
    spans: list[Span] = []
    for i, path in enumerate(inputs):
        kind = input_kind(path, fmt)
        if kind in ("dir", "parquet", "webdataset", "embeddings"):  # spans by position: no byte offsets
            n = len(_span_files(path)) if kind == "dir" else _parquet_rows(path) if kind == "parquet" \
                else _embedding_rows(path) if kind == "embeddings" else _wds_count(path)
            starts = [0] * -(-n // size)
        else:
            n, starts = _line_starts(path, size)
        spans += [Span(i, k * size, min(size, n - k * size), off) for k, off in enumerate(starts)]
    return spans


def _line_starts(path: InputPath, every: int) -> tuple[int, list[int]]:
    """The number of lines in a file and the byte offset of line 0, every, 2*every, ..."""
    starts, newlines, size, last = [0], 0, 0, b"\n"
    with open_input(path, "rb") as f:
        for chunk in iter(lambda: f.read(_SCAN_CHUNK), b""):
            ends = np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10)
            numbers = newlines + 1 + np.arange(len(ends))  # the (0-based) lines that start after these ends
            starts.extend((ends[numbers % every == 0] + size + 1).tolist())
            newlines, size, last = newlines + len(ends), size + len(chunk), chunk[-1:]
    lines = newlines + (last != b"\n")
    return lines, [s for s in starts if s < size]


def count_records(inputs: Sequence[InputPath], fmt: str = "auto") -> int:
    """A cheap upper bound for the progress bar: lines of files, image files of directories."""
    return sum(s.count for s in plan_spans(inputs, fmt, 1 << 62))
