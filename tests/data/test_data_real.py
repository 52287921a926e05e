"""The real public files in ../shared/datasets (see SOURCES.md there) load, are detected and validate.

Record counts are the ones SOURCES.md states. The dropped rows were found by reading the raw files independently of
this code: UltraFeedback train_clean.jsonl has chosen == rejected at rows 307, 656, 911, 998 and an empty string
at row 479 (rejected) and 834 (chosen); HH-RLHF helpful-base test has identical transcripts at rows 722 and 2169
and a final Assistant turn with no text in the rejected transcript of rows 121, 741, 1215, 2064.
"""

import gzip
import json

import pytest

from posttrain.data import DataError, DataKind, detect_kind, load_records, prepare, validate
from posttrain.data.errors import RowRef
from posttrain.data.schema import normalise


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------------- UltraFeedback

def test_ultrafeedback(shared_datasets):
    path = str(shared_datasets / "ultrafeedback" / "train_clean.jsonl")
    loaded = load_records(path)
    assert len(loaded.records) == 1000
    assert detect_kind(loaded.records, path) is DataKind.PREFERENCE
    with pytest.raises(DataError) as e:
        validate(loaded.records, DataKind.PREFERENCE, path)
    assert (e.value.file, e.value.row, e.value.field, e.value.got[:10]) == (path, 479, "rejected", "'' (empty)")

    data = prepare(path, drop_empty=True)
    assert len(data.rows) == 994
    assert data.dropped == {"identical_pair": 4, "empty_response": 2}
    assert data.dropped_rows == {"identical_pair": [307, 656, 911, 998], "empty_response": [479, 834]}
    first = data.rows[0]
    assert first["prompt"] == [U("how to cook t-bone in the oven")]
    assert first["chosen"] == [A(loaded.records[0]["chosen"])]
    assert first["rejected"] == [A(loaded.records[0]["rejected"])]
    assert data.profile["rows"] == 994


# ---------------------------------------------------------------------------------------------------- HH-RLHF

def test_hh_rlhf_prompt_extraction(shared_datasets):
    directory = shared_datasets / "hh_rlhf" / "helpful-base"
    path = str(directory / "test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh]
    assert len(raw) == 2354

    with pytest.raises(DataError) as e:
        prepare(path)
    assert (e.value.row, e.value.field) == (121, "rejected")
    assert e.value.got.startswith("'' (empty) as the final assistant turn")

    data = prepare(str(directory), split="test", drop_empty=True)  # the directory form picks test.jsonl.gz
    assert data.source == path
    assert data.kind is DataKind.PREFERENCE
    assert len(data.rows) == 2348
    assert data.dropped == {"empty_response": 4, "identical_pair": 2}
    assert data.dropped_rows == {"empty_response": [121, 741, 1215, 2064], "identical_pair": [722, 2169]}

    # Row 1: one Human turn, then the two answers; the expected text is cut from the raw transcripts by hand.
    human = "Do you know why turkeys became the official food of thanksgiving?"
    assert raw[0]["chosen"].startswith(f"\n\nHuman: {human}\n\nAssistant: ")
    assert data.rows[0]["prompt"] == [U(human)]
    assert data.rows[0]["chosen"] == [A(raw[0]["chosen"].split("\n\nAssistant: ", 1)[1])]
    assert data.rows[0]["rejected"] == [A(raw[0]["rejected"].split("\n\nAssistant: ", 1)[1])]
    assert data.rows[0]["chosen"][0]["content"].startswith("To be honest, I don’t know anything about that.")

    # Row 2: a three-question conversation; the prompt keeps the first five turns, the answers differ in the last.
    second = data.rows[1]
    assert [m["role"] for m in second["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
    assert second["prompt"][0] == U("How can I find out what types of butterflies are in my area?")
    assert second["prompt"][2] == U("I am in Oregon.")
    assert second["prompt"][4] == U("Great. What are some common species then?")
    assert second["chosen"][0]["content"].startswith("About 150 species of butterflies live in Oregon")
    assert second["rejected"][0]["content"].startswith("Are you interested in just the common butterflies?")

    # Row 169: the rejected transcript has two Assistant turns in a row after the shared prompt.
    row169 = normalise(raw[168], DataKind.PREFERENCE, RowRef(path, 169))
    assert [m["role"] for m in row169["chosen"]] == ["assistant"]
    assert [m["role"] for m in row169["rejected"]] == ["assistant", "assistant"]
    assert data.profile["duplicates"] == 0


# ---------------------------------------------------------------------------------------------------- ShareGPT pairs

def test_pairwise_demo_sharegpt(shared_datasets):
    path = str(shared_datasets / "pairwise_demo" / "dpo_en_demo.json")
    data = prepare(path)
    assert data.kind is DataKind.PREFERENCE
    assert (len(data.rows), data.dropped) == (300, {})
    first = data.rows[0]
    assert first["prompt"] == [U("Hi! I'd like to create a new language game simulating the first person "
                                 "perspective of a character named Angela.")]
    assert first["chosen"][0]["role"] == "assistant"
    assert first["chosen"][0]["content"].startswith("That sounds like a fun and engaging idea!")
    assert first["rejected"][0]["content"].startswith("Hello! I'd be happy to help you")
    # 80 conversations open with a system turn; the file holds 5 exact duplicate records.
    assert sum(r["prompt"][0]["role"] == "system" for r in data.rows) == 80
    assert data.profile["duplicates"] == 5


# ---------------------------------------------------------------------------------------------------- KTO

def test_kto_unpaired(shared_datasets):
    path = str(shared_datasets / "kto" / "kto_en_demo.json")
    data = prepare(path)
    assert data.kind is DataKind.UNPAIRED
    assert (len(data.rows), data.dropped) == (300, {})
    assert data.profile["labels"] == {"true": 150, "false": 150, "true_fraction": 0.5}
    first = data.rows[0]
    assert first["label"] is True
    assert [m["role"] for m in first["prompt"]] == ["user"]
    assert first["prompt"][0]["content"].startswith("The Federal Trade Commission is going after spyware")
    assert first["completion"][0]["content"].startswith("Ooh ooh ah ah! *giggle*")
    assert all(r["completion"][-1]["role"] == "assistant" and len(r["completion"]) == 1 for r in data.rows)


# ---------------------------------------------------------------------------------------------------- GSM8K

@pytest.mark.parametrize("split, count", [("test", 1319), ("train", 7473)])
def test_gsm8k_verifiable(shared_datasets, split, count):
    path = str(shared_datasets / "gsm8k" / f"{split}.jsonl")
    data = prepare(path)
    assert data.kind is DataKind.VERIFIABLE
    assert (len(data.rows), data.dropped) == (count, {})
    # Every GSM8K answer ends in "#### <number>", so every normalised answer is numeric.
    assert (data.profile["numeric_answers"], data.profile["numeric_answer_fraction"]) == (count, 1.0)
    if split == "test":
        assert data.rows[0]["answer"] == "18"
        assert data.rows[0]["prompt"][0]["content"].startswith("Janet’s ducks lay 16 eggs per day.")


def test_gsm8k_directory_default_split_is_train(shared_datasets):
    loaded = load_records(str(shared_datasets / "gsm8k"), limit=5)
    assert (loaded.split, len(loaded.records)) == ("train", 5)
    assert loaded.source.endswith("train.jsonl")


# ---------------------------------------------------------------------------------------------------- other files

def test_files_of_no_known_kind_are_refused_at_row_1(shared_datasets):
    for name in ("humaneval/HumanEval.jsonl.gz", "mt_bench/question.jsonl", "truthfulqa/v0/mc_task.json"):
        path = str(shared_datasets / name)
        with pytest.raises(DataError) as e:
            prepare(path)
        assert (e.value.file, e.value.row, e.value.field) == (path, 1, None)
        assert "preference: chosen+rejected" in e.value.expected


def test_real_csv_files_load(shared_datasets):
    tqa = load_records(str(shared_datasets / "truthfulqa" / "v0" / "TruthfulQA.csv"))
    assert len(tqa.records) == 817
    assert list(tqa.records[0])[0] == "Type"  # the BOM is not part of the first column name
    assert tqa.records[0]["Question"] == "What happens to you if you eat watermelon seeds?"
    mmlu = load_records(str(shared_datasets / "mmlu" / "test" / "abstract_algebra_test.csv"))
    assert len(mmlu.records) == 100
    assert list(mmlu.records[0]) == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
