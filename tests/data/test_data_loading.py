import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.data.errors import DataError
from posttrain.data.loading import load_records

RECORDS = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": "f"}]


def test_jsonl(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    loaded = load_records(str(path))
    assert loaded.records == RECORDS
    assert loaded.source == str(path)
    assert loaded.format == "jsonl"
    assert loaded.split is None


def test_jsonl_gz(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl.gz", RECORDS, gz=True)
    assert load_records(str(path)).records == RECORDS


def test_jsonl_limit_stops_reading(tmp_path):
    # The broken third line is never read: limit is a promise to look at the first N records only.
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\nnot json\n')
    assert load_records(str(path), limit=2).records == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(DataError):
        load_records(str(path))


def test_jsonl_bom_crlf_and_trailing_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n\r\n\n')
    assert load_records(str(path)).records == [{"text": "a"}, {"text": "b"}]


def test_jsonl_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n')
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert (e.value.file, e.value.row, e.value.field, e.value.expected) == (str(path), 3, None, "a JSON object")
    assert str(e.value).startswith(f"{path}: row 3: expected a JSON object, got invalid JSON")


@pytest.mark.parametrize("line, phrase", [
    ('{"text": "a\tb"}\n', "Invalid control character at column 12"),  # the decoder's message ends in "at"
    ('{"text": "abc', "Unterminated string starting at column 10"),  # so does this one (last line, no newline)
    ('{"text": 1,}\n', "Expecting property name enclosed in double quotes at column 12"),
])
def test_jsonl_bad_json_reads_as_one_phrase(tmp_path, line, phrase):
    # Regression: "Invalid control character at at column 56" (the decoder's trailing "at" plus ours).
    path = tmp_path / "d.jsonl"
    path.write_text(line)
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert f"invalid JSON ({phrase}): " in e.value.got
    assert " at at " not in str(e.value)


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert (e.value.row, e.value.field, e.value.expected) == (2, None, "a JSON object")
    assert "a list of 2" in e.value.got


def test_jsonl_blank_line_inside_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert e.value.row == 2
    assert "blank line" in e.value.got


def test_jsonl_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert (e.value.row, e.value.expected) == (2, "UTF-8 text")


def test_truncated_gzip_fails_whole(tmp_path, write_jsonl):
    whole = write_jsonl(tmp_path / "whole.jsonl.gz", [{"text": "x" * 50, "i": i} for i in range(2000)], gz=True)
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError) as e:
        load_records(str(cut))
    assert (e.value.row, e.value.expected) == (None, "a complete gzip file")


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(RECORDS))
    loaded = load_records(str(path), limit=2)
    assert loaded.records == RECORDS[:2]
    assert loaded.format == "json"


@pytest.mark.parametrize("key", ["data", "train", "rows"])
def test_json_object_holding_one_list(tmp_path, key):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": 1, key: RECORDS}))
    assert load_records(str(path)).records == RECORDS


def test_json_object_keyed_by_split(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"train": RECORDS[:2], "test": RECORDS[2:]}))
    assert load_records(str(path)).records == RECORDS[:2]  # train by default, as for directories
    test = load_records(str(path), split="test")
    assert (test.records, test.split) == (RECORDS[2:], "test")
    with pytest.raises(DataError) as e:
        load_records(str(path), split="validation")
    assert "'validation'" in e.value.expected


def test_json_object_with_ambiguous_lists(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"a": RECORDS, "b": RECORDS}))
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert e.value.row is None
    assert "['a', 'b']" in e.value.got


def test_json_array_element_not_an_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([RECORDS[0], "oops"]))
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert (e.value.row, e.value.expected, e.value.got) == (2, "a JSON object", "'oops'")


def test_json_that_is_really_jsonl(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.json", RECORDS)
    assert load_records(str(path)).records == RECORDS


def test_json_invalid(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1},\n {"a": 2')
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert e.value.row is None
    assert "line 2" in e.value.got


def test_json_invalid_control_character_says_at_once(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"a": 1},\n {"a": "x\ty"}]')
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert e.value.got == "invalid JSON (Invalid control character at line 2, column 10)"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r", "n": 1.5}] * 5
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    loaded = load_records(str(path))
    assert (loaded.records, loaded.format) == (rows, "parquet")
    assert load_records(str(path), limit=3).records == rows[:3]


def test_parquet_corrupt(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert (e.value.row, e.value.expected) == (None, "a readable Parquet file")


def test_csv_with_bom_quotes_and_newlines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes('\ufeffquestion,answer\n"Sum, please","line one\nline two"\nx,#### 3\n'.encode("utf-8"))
    loaded = load_records(str(path))
    assert loaded.records == [{"question": "Sum, please", "answer": "line one\nline two"},
                              {"question": "x", "answer": "#### 3"}]
    assert loaded.format == "csv"
    assert load_records(str(path), limit=1).records == loaded.records[:1]


def test_csv_row_with_wrong_column_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert (e.value.row, e.value.expected) == (2, "2 columns (as in the header)")
    assert e.value.got == "3 columns (file line 3)"


def test_csv_duplicate_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,a\n1,2\n")
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert e.value.got == "repeated names ['a']"


def test_directory_by_split(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", RECORDS[:1])
    write_jsonl(tmp_path / "test.jsonl.gz", RECORDS[1:], gz=True)
    train = load_records(str(tmp_path))
    assert (train.records, train.split, train.source) == (RECORDS[:1], "train", str(tmp_path / "train.jsonl"))
    assert load_records(str(tmp_path), split="test").records == RECORDS[1:]
    with pytest.raises(DataError) as e:
        load_records(str(tmp_path), split="validation")
    assert e.value.file == str(tmp_path)
    assert "test.jsonl.gz, train.jsonl" in e.value.got


def test_directory_with_two_files_for_one_split(tmp_path, write_jsonl):
    write_jsonl(tmp_path / "train.jsonl", RECORDS)
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    with pytest.raises(DataError) as e:
        load_records(str(tmp_path))
    assert "train.jsonl" in e.value.got and "train.json" in e.value.got


def test_split_that_does_not_match_a_single_file_is_refused(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    assert load_records(str(path), split="train").records == RECORDS
    with pytest.raises(DataError) as e:
        load_records(str(path), split="test")
    assert "split=None" in e.value.expected


def test_missing_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub must not be asked"))
    for source in [str(tmp_path / "nope.jsonl"), "./nope", "data/x.csv"]:
        with pytest.raises(DataError) as e:
            load_records(source)
        assert (e.value.file, e.value.got) == (source, "no such path")


def test_unknown_suffix(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(DataError) as e:
        load_records(str(path))
    assert e.value.got == "a file named 'd.txt'"


def test_bad_limit(tmp_path, write_jsonl):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    for limit in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            load_records(str(path), limit=limit)


def test_hub_success_and_limit(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    loaded = load_records("owner/name", limit=2)
    assert (loaded.records, loaded.format, loaded.split, loaded.source) == (RECORDS[:2], "hub", "train", "owner/name")
    load_records("owner/name", split="test")
    assert calls == [("owner/name", "train"), ("owner/name", "test")]


def test_hub_failure_is_one_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def unreachable(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError) as e:
        load_records("owner/name")
    assert (e.value.file, e.value.row, e.value.field) == ("owner/name", None, None)
    assert e.value.got == "ConnectionError: Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)"
    assert e.value.__suppress_context__  # no chained traceback from inside datasets


def test_hub_offline_for_real(tmp_path):
    # The real `datasets` call, with the hub switched off (as on a machine with no network): one DataError.
    pytest.importorskip("datasets")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src")
    code = ("from posttrain.data.loading import load_records\nfrom posttrain.data.errors import DataError\n"
            "try:\n    load_records('someone/no-such-dataset')\nexcept DataError as e:\n    print('DataError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("DataError: someone/no-such-dataset: expected a local file or directory, or a "
                                 "Hugging Face hub dataset that is cached or reachable, got ")


def test_a_row_that_is_not_an_object_is_named_with_the_right_article():
    # Regression: "a int, not an object".
    from posttrain.data.errors import DataError
    from posttrain.data.kinds import detect_kind

    for row, said in ((7, "an int, not an object"), ([1], "a list, not an object")):
        with pytest.raises(DataError) as error:
            detect_kind([row], "rows.jsonl")
        assert said in str(error.value)
