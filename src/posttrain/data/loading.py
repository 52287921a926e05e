"""Load raw records (plain dicts) from a local file, a directory of split files, or a Hugging Face hub dataset.

Guarantees:
- formats: `.jsonl`, `.jsonl.gz`, `.json` (an array of objects, an object holding the list under one key, or
  JSON Lines misnamed `.json`), `.parquet`, `.csv` (header row, UTF-8 with or without BOM, every value a string);
- a directory is searched for `<split>.jsonl|.jsonl.gz|.json|.parquet|.csv` (split defaults to "train");
- anything else that is not a path is treated as a hub dataset id and loaded with `datasets.load_dataset`;
  a hub that cannot be reached is one `DataError`, not a traceback from inside `datasets`;
- every record is a dict; a line or element that is not a JSON object is a `DataError` naming the file and the
  1-based row (for JSON Lines, the line number: blank lines are only accepted at the end of the file, so the row
  number of a record is always its line number);
- a file is loaded whole or not at all (first problem raises), except that `limit` stops reading after `limit`
  records, so problems beyond them go unseen;
- for a single file, `split` is only used to pick a key of a JSON object; a split that does not match the file's
  name is refused rather than ignored, so asking for "test" can never silently return training data.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from posttrain.data.errors import DataError, describe

# Longest suffix first: ".jsonl.gz" must win over ".gz".
_SUFFIXES = (".jsonl.gz", ".jsonl", ".json", ".parquet", ".csv")
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class LoadedData:
    source: str  # the path or hub id, as shown in error messages
    records: list[dict[str, Any]]
    format: str  # "jsonl", "json", "parquet", "csv" or "hub"
    split: str | None = None  # the split actually selected (None for a plain single file)


def load_records(source: str, split: str | None = None, limit: int | None = None) -> LoadedData:
    """Load every record of `source` (or the first `limit`)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_file(_split_file(path, source, split or "train"), split or "train", limit, from_dir=True)
    if path.is_file():
        return _load_file(path, split, limit, from_dir=False)
    if _looks_local(source):
        raise DataError(source, None, None, "an existing file or directory", "no such path")
    return _load_hub(source, split, limit)


def _looks_local(source: str) -> bool:
    # A hub id is "name" or "owner/name"; anything with a data-file suffix, more slashes or a path prefix is a
    # path that does not exist, and must not be sent to the hub (where it would fail with a confusing message).
    lowered = source.lower()
    return (source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") > 1
            or lowered.endswith(_SUFFIXES + (".gz",)))


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in _SUFFIXES if name.endswith(s)), None)


def _split_file(directory: Path, source: str, split: str) -> Path:
    found = [directory / f"{split}{s}" for s in _SUFFIXES if (directory / f"{split}{s}").is_file()]
    if len(found) == 1:
        return found[0]
    wanted = ", ".join(f"{split}{s}" for s in _SUFFIXES)
    if not found:
        present = sorted(p.name for p in directory.iterdir())
        shown = ", ".join(present[:10]) + (f", … ({len(present)} entries)" if len(present) > 10 else "")
        raise DataError(source, None, None, f"one file for split {split!r} ({wanted})",
                        f"a directory holding {shown or 'nothing'}")
    raise DataError(source, None, None, f"exactly one file for split {split!r}",
                    "several: " + ", ".join(p.name for p in found))


def _load_file(path: Path, split: str | None, limit: int | None, *, from_dir: bool) -> LoadedData:
    shown = str(path)
    kind = _suffix(path)
    if kind is None:
        raise DataError(shown, None, None, "a .jsonl, .jsonl.gz, .json, .parquet or .csv file",
                        f"a file named {path.name!r}")
    if kind == ".json":
        records, used_split = _read_json(path, shown, split, limit)
        return LoadedData(shown, records, "json", used_split)
    if split is not None and not from_dir and not path.name.lower().startswith(split.lower()):
        raise DataError(shown, None, None,
                        f"a file for split {split!r} (a single file is one split: pass split=None, or point at a "
                        f"directory holding {split}.jsonl etc.)", f"a file named {path.name!r}")
    used = split if from_dir else None
    if kind == ".jsonl":
        return LoadedData(shown, _read_jsonl_file(path, shown, limit, gz=False), "jsonl", used)
    if kind == ".jsonl.gz":
        return LoadedData(shown, _read_jsonl_file(path, shown, limit, gz=True), "jsonl", used)
    if kind == ".parquet":
        return LoadedData(shown, _read_parquet(path, shown, limit), "parquet", used)
    return LoadedData(shown, _read_csv(path, shown, limit), "csv", used)


# ---------------------------------------------------------------------------------------------------- JSON Lines

def json_problem(e: json.JSONDecodeError, *, line: bool) -> str:
    """The decoder's message with its position, read as one phrase: "Expecting value at column 7",
    "Invalid control character at line 3, column 9". Some of the decoder's messages already end in "at"
    ("Invalid control character at", "Unterminated string starting at"); that "at" is not repeated."""
    msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg
    where = f"line {e.lineno}, column {e.colno}" if line else f"column {e.colno}"
    return f"{msg} at {where}"


def _parse_jsonl(lines: Iterable[bytes], shown: str, limit: int | None) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    first_blank: int | None = None
    for lineno, raw in enumerate(lines, start=1):
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(shown, lineno, None, "UTF-8 text", f"undecodable bytes at column {e.start + 1}") from None
        if not text.strip():
            first_blank = first_blank or lineno
            continue
        if first_blank is not None:
            # A blank line inside the file would make record numbers and line numbers disagree; refuse it.
            raise DataError(shown, first_blank, None, "a JSON object", "a blank line inside the file")
        records.append(_parse_object(text, shown, lineno))
        if limit is not None and len(records) >= limit:
            break
    return records


def _parse_object(text: str, shown: str, lineno: int) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(shown, lineno, None, "a JSON object",
                        f"invalid JSON ({json_problem(e, line=False)}): {describe(text.strip())}") from None
    if not isinstance(value, dict):
        raise DataError(shown, lineno, None, "a JSON object", describe(value))
    return value


def _read_jsonl_file(path: Path, shown: str, limit: int | None, *, gz: bool) -> list[dict[str, Any]]:
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            return _parse_jsonl(fh, shown, limit)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        # Gzip streams are checked as they are read, so a corrupt or truncated file fails here, whole.
        raise DataError(shown, None, None, "a complete gzip file", f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------- JSON

def _read_json(path: Path, shown: str, split: str | None, limit: int | None) -> tuple[list[dict], str | None]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(shown, None, None, "UTF-8 text", f"undecodable bytes at offset {e.start}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            # Many datasets ship JSON Lines under a .json name; read it as such (as `datasets` does).
            return _parse_jsonl(data.splitlines(), shown, limit), None
        raise DataError(shown, None, None, "a JSON array of objects, or an object holding one",
                        f"invalid JSON ({json_problem(e, line=True)})") from None
    used_split = None
    if isinstance(value, dict):
        value, used_split = _pick_list(value, shown, split)
    elif split is not None and not path.name.lower().startswith(split.lower()):
        raise DataError(shown, None, None, f"a file for split {split!r} (pass split=None for a single file)",
                        f"a JSON array in a file named {path.name!r}")
    if not isinstance(value, list):
        raise DataError(shown, None, None, "a JSON array of objects, or an object holding one", describe(value))
    if limit is not None:
        value = value[:limit]
    for i, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise DataError(shown, i, None, "a JSON object", describe(item))
    return value, used_split


def _pick_list(obj: dict[str, Any], shown: str, split: str | None) -> tuple[Any, str | None]:
    lists = [k for k, v in obj.items() if isinstance(v, list)]
    if split is not None:
        if split in lists:
            return obj[split], split
        raise DataError(shown, None, None, f"a list of records under the key {split!r}",
                        f"an object with list keys {lists}" if lists else describe(obj))
    if len(lists) == 1:
        return obj[lists[0]], None
    # Several lists: take the same default as everywhere else (train), then the conventional "data".
    for key in ("train", "data"):
        if key in lists:
            return obj[key], key
    raise DataError(shown, None, None, "an object holding one list of records (or pass split= to pick one)",
                    f"an object with list keys {lists}" if lists else describe(obj))


# ---------------------------------------------------------------------------------------------------- Parquet

def _read_parquet(path: Path, shown: str, limit: int | None) -> list[dict[str, Any]]:
    import pyarrow as pa  # a dependency of `datasets`; imported here so plain JSON users do not pay for it
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if limit is None:
            return pf.read().to_pylist()
        records: list[dict[str, Any]] = []
        for batch in pf.iter_batches(batch_size=min(limit, 65536)):
            records.extend(batch.to_pylist())
            if len(records) >= limit:
                break
        return records[:limit]
    except (pa.ArrowException, OSError) as e:
        raise DataError(shown, None, None, "a readable Parquet file", f"{type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------------------------------------- CSV

def _read_csv(path: Path, shown: str, limit: int | None) -> list[dict[str, Any]]:
    # The default field limit (128 KiB) is below some real texts (code, long documents); raise it while reading.
    old_limit = csv.field_size_limit(2**31 - 1)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                return []
            if len(set(header)) != len(header):
                dupes = sorted({h for h in header if header.count(h) > 1})
                raise DataError(shown, None, None, "unique column names in the header row",
                                f"repeated names {dupes}")
            records: list[dict[str, Any]] = []
            for cells in reader:
                if not cells:
                    continue  # a blank line is not a record (csv convention); row numbers count records
                row = len(records) + 1
                if len(cells) != len(header):
                    raise DataError(shown, row, None, f"{len(header)} columns (as in the header)",
                                    f"{len(cells)} columns (file line {reader.line_num})")
                records.append(dict(zip(header, cells)))
                if limit is not None and len(records) >= limit:
                    break
            return records
    except UnicodeDecodeError as e:
        raise DataError(shown, None, None, "UTF-8 text", f"undecodable bytes ({e.reason})") from None
    except csv.Error as e:
        raise DataError(shown, None, None, "valid CSV", str(e)) from None
    finally:
        csv.field_size_limit(old_limit)


# ---------------------------------------------------------------------------------------------------- hub

def _load_hub(source: str, split: str | None, limit: int | None) -> LoadedData:
    used = split or "train"
    try:
        import datasets  # heavy import; only hub ids need it

        ds = datasets.load_dataset(source, split=used)
    except Exception as e:  # noqa: BLE001 - any failure inside `datasets` becomes one readable DataError
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise DataError(source, None, None,
                        "a local file or directory, or a Hugging Face hub dataset that is cached or reachable",
                        f"{type(e).__name__}: {first_line}") from None
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return LoadedData(source, ds.to_list(), "hub", used)
