from posttrain.data.errors import DataError, RowRef, describe


def test_message_format():
    e = DataError("data/train.jsonl", 17, "chosen", "a non-empty string", describe(""))
    assert str(e) == "data/train.jsonl: row 17, field 'chosen': expected a non-empty string, got '' (empty)"
    assert isinstance(e, ValueError)
    assert (e.file, e.row, e.field, e.expected, e.got, e.drop_reason) == (
        "data/train.jsonl", 17, "chosen", "a non-empty string", "'' (empty)", None)


def test_file_level_and_row_level_without_field():
    assert str(DataError("d.json", None, None, "a JSON array", "null")) == "d.json: expected a JSON array, got null"
    row_level = DataError("d.jsonl", 3, None, "a JSON object", "'x'")
    assert str(row_level) == "d.jsonl: row 3: expected a JSON object, got 'x'"
    assert str(DataError("d.csv", None, "a", "x", "y")) == "d.csv: field 'a': expected x, got y"


def test_row_ref_builds_errors():
    e = RowRef("f.jsonl", 2).error("label", "true or false", "1 (a number)", drop_reason="r")
    assert (e.file, e.row, e.field, e.drop_reason) == ("f.jsonl", 2, "label", "r")


def test_describe_is_short():
    long = describe("x" * 10_000)
    assert len(long) <= 100
    assert long.endswith("…' (10000 chars)")
    assert len(describe(list(range(1000)))) <= 90
    assert describe([1, 2]) == "[1, 2] (a list of 2)"
    assert describe({"a": 1, "b": 2}) == "an object with fields 'a', 'b'"
    assert describe({}) == "an empty object"
    assert describe(None) == "null"
    assert describe(True) == "true (a boolean)"
    assert describe(3.5) == "3.5 (a number)"
    assert describe("  ") == "'  ' (blank)"
    assert describe("ok") == "'ok'"


def test_got_is_capped_even_when_callers_pass_long_text():
    assert len(DataError("f", 1, "x", "y", "z" * 1000).got) <= 160
