"""MMLU, ARC and TruthfulQA: prompts, gold lookup and metrics checked exactly on hand-made log-likelihoods; then
each benchmark end to end on tiny random models of two architectures with two different tokenizers."""

import json
import math

import pytest

import posttrain.evaluate.loglikelihood as ll_mod
from posttrain.evaluate.benchmarks import EvalContext, get_benchmark
from posttrain.evaluate.benchmarks import arc, mmlu, truthfulqa
from posttrain.evaluate.harness import BenchmarkUnavailable

BENCHMARKS = ["mmlu", "arc_easy", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2"]
METRICS = {"mmlu": {"acc"}, "arc_easy": {"acc", "acc_norm"}, "arc_challenge": {"acc", "acc_norm"},
           "truthfulqa_mc1": {"mc1"}, "truthfulqa_mc2": {"mc2"}}


def fake_scores(table, seen=None):
    """Stands in for score_choices: log-likelihoods from `table(prompt, continuations)`."""
    def fake(model, tokenizer, questions, **kw):
        if seen is not None:
            seen.append((questions, kw))
        return [table(p, conts) for p, conts in questions]
    return fake


def ctx(data_dir, **kw):
    return EvalContext(model=None, tokenizer=None, data_dir=data_dir, max_length=64, **kw)


# ------------------------------------------------------------------------------------------------ ARC

def test_acc_and_acc_norm_disagree_by_character_length():
    assert arc.predictions([-2.0, -5.0], ["a", "bbbbbbbbbb"]) == (0, 1)  # -2/1 < -5/10
    assert arc.predictions([-3.0, -3.0], ["abc", "abc"]) == (0, 0)  # ties go to the first choice


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def arc_row(id_, stem, texts, labels, key):
    return {"id": id_, "question": {"stem": stem, "choices": [{"text": t, "label": lab} for t, lab in
                                                              zip(texts, labels)]}, "answerKey": key}


def test_arc_metrics_on_hand_made_loglikelihoods(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl", [
        arc_row("q1", "One?", ["Yes", "No way at all", "Maybe so", "Never"], "ABCD", "A"),
        arc_row("q2", "Two?", ["red", "deep ocean blue", "green"], ["1", "2", "3"], "2"),
        arc_row("q3", "Three?", ["a", "bb", "ccc", "dddd", "eeeee"], "ABCDE", "E"),
    ])
    lls = {"One?": [-3.0, -6.0, -9.0, -12.0],  # acc right (0); norm -1, -0.46, -1.125, -2.4 -> 1, wrong
           "Two?": [-4.0, -10.0, -5.0],  # acc 0, wrong; norm -1.33, -0.67, -1 -> 1, right
           "Three?": [-1.0, -2.0, -3.0, -4.0, -4.5]}  # acc 0, wrong; norm -1, -1, -1, -1, -0.9 -> 4, right
    seen = []
    monkeypatch.setattr(arc, "score_choices", fake_scores(lambda p, c: lls[p.split("Question: ")[1][:-8]], seen))
    result = arc.run_arc_easy(ctx(tmp_path))
    assert result.metrics["acc"].value == pytest.approx(1 / 3) and result.metrics["acc"].n == 3
    assert result.metrics["acc_norm"].value == pytest.approx(2 / 3)
    assert [s["gold"] for s in result.samples] == [0, 1, 4]
    questions, kw = seen[0]
    assert questions[1] == ("Question: Two?\nAnswer:", [" red", " deep ocean blue", " green"])
    assert kw["add_special_tokens"] is True


def test_arc_fewshot_examples_do_not_depend_on_limit(datasets_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(arc, "score_choices", fake_scores(lambda p, c: [0.0] * len(c), seen))
    small = arc.run_arc_challenge(ctx(datasets_dir, limit=5, options={"num_fewshot": 2}))
    everything = arc.run_arc_challenge(ctx(datasets_dir, options={"num_fewshot": 2}))
    full = {s["id"]: s["prompt_sha256"] for s in everything.samples}
    assert len(full) == 1172
    for s in small.samples:
        assert s["prompt_sha256"] == full[s["id"]]
    prompt = seen[0][0][0][0]
    assert prompt.count("Question: ") == 3 and prompt.count("\n\n") == 2 and prompt.endswith("\nAnswer:")


def test_chat_template_drops_the_delimiter_and_the_added_bos(tiny_tokenizer, datasets_dir, monkeypatch):
    seen = []
    monkeypatch.setattr(arc, "score_choices", fake_scores(lambda p, c: [0.0] * len(c), seen))
    result = arc.run_arc_easy(EvalContext(None, tiny_tokenizer, data_dir=datasets_dir, limit=2, max_length=64,
                                          options={"chat_template": True}))
    (prompt, conts), kw = seen[0][0][0], seen[0][1]
    assert prompt.startswith("<s><|user|>\nQuestion: ") and "\nAnswer:" in prompt and prompt.endswith("<|assistant|>\n")
    assert not any(c.startswith(" ") for c in conts) and kw["add_special_tokens"] is False
    assert result.settings["chat_template"] is True


# ------------------------------------------------------------------------------------------------ TruthfulQA

def test_mc2_normalisation_exact():
    assert truthfulqa.mc2_score([math.log(0.5), math.log(0.2), math.log(0.1)], [1, 0, 1]) == pytest.approx(0.75)
    # exp(-2000) underflows to 0 in float64; normalising by the largest first keeps the exact ratio
    assert truthfulqa.mc2_score([-2000.0, -2001.0], [0, 1]) == pytest.approx(1 / (1 + math.e))


def test_truthfulqa_metrics_on_hand_made_loglikelihoods(tmp_path, monkeypatch):
    path = tmp_path / "truthfulqa" / "v0" / "mc_task.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([
        {"question": "First?", "mc1_targets": {"T": 1, "F1": 0, "F2": 0},
         "mc2_targets": {"F": 0, "T1": 1, "T2": 1}},  # true choices NOT first
        {"question": "Second?", "mc1_targets": {"A": 1, "B": 0}, "mc2_targets": {"A": 1, "B": 0, "C": 1}},
    ]))
    lls = {("First?", "T"): -1.0, ("First?", "F1"): -2.0, ("First?", "F2"): -0.5,  # mc1 wrong
           ("First?", "F"): math.log(0.2), ("First?", "T1"): math.log(0.3), ("First?", "T2"): math.log(0.1),
           ("Second?", "A"): math.log(0.5), ("Second?", "B"): math.log(0.25), ("Second?", "C"): math.log(0.25)}

    def table(prompt, conts):
        assert prompt.startswith(truthfulqa.QA_PRIMER + "\n\nQ: ") and prompt.endswith("?\nA:")
        question = prompt.rsplit("\n\nQ: ", 1)[1][:-3]
        return [lls[(question, c[1:])] for c in conts]

    monkeypatch.setattr(truthfulqa, "score_choices", fake_scores(table))
    mc1 = truthfulqa.run_truthfulqa_mc1(ctx(tmp_path))
    assert mc1.metrics["mc1"].value == pytest.approx(0.5) and mc1.metrics["mc1"].n == 2
    mc2 = truthfulqa.run_truthfulqa_mc2(ctx(tmp_path))
    assert mc2.metrics["mc2"].value == pytest.approx((0.4 / 0.6 + 0.75) / 2)
    assert mc2.samples[0]["gold"] == [1, 2]


def test_primer_is_the_six_qa_pairs():
    assert truthfulqa.QA_PRIMER.count("Q: ") == 6 and truthfulqa.QA_PRIMER.count("\nA: ") == 6
    assert "A: I have no comment." in truthfulqa.QA_PRIMER
    assert truthfulqa.truthfulqa_prompt("Why?").endswith("Barcelona, Spain.\n\nQ: Why?\nA:")


# ------------------------------------------------------------------------------------------------ MMLU

EXPECTED_ABSTRACT_ALGEBRA_0 = (
    "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
    "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
    "Statement 1 | If aH is an element of a factor group, then |aH| divides |a|. Statement 2 | If H and K are "
    "subgroups of G then HK is a subgroup of G.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\n"
    "Answer: B\n\n"
    "Statement 1 | Every element of a group generates a cyclic subgroup of the group. Statement 2 | The symmetric "
    "group S_10 has 10 elements.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: C\n\n"
    "Statement 1| Every function from a finite set onto itself must be one to one. Statement 2 | Every subgroup of "
    "an abelian group is abelian.\nA. True, True\nB. False, False\nC. True, False\nD. False, True\nAnswer: A\n\n"
    "Find the characteristic of the ring 2Z.\nA. 0\nB. 3\nC. 12\nD. 30\nAnswer: A\n\n"
    "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
    "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
)


def test_mmlu_prompt_for_a_known_question(datasets_dir):
    test, dev = mmlu.load_split(datasets_dir, "test"), mmlu.load_split(datasets_dir, "dev")
    assert sum(map(len, test.values())) == 14042 and all(len(v) == 5 for v in dev.values())
    assert mmlu.build_prompt(test["abstract_algebra"][0], dev["abstract_algebra"][:5]) == EXPECTED_ABSTRACT_ALGEBRA_0
    files = {p.name[:-len("_test.csv")] for p in (datasets_dir / "mmlu" / "test").iterdir()}
    assert len(mmlu.SUBJECTS) == 57 and set(mmlu.SUBJECTS) == files


def write_mmlu(root):
    for split, n in (("dev", 5), ("test", 1)):
        (root / "mmlu" / split).mkdir(parents=True)
        for s in mmlu.SUBJECTS:
            rows = "".join(f'"{split} {k} of {s}, with a comma?",w,x,y,z,{k % 4}\n' for k in range(n))
            header = "question,choice0,choice1,choice2,choice3,answer\n"
            (root / "mmlu" / split / f"{s}_{split}.csv").write_text(header + rows)


def test_mmlu_micro_average_and_categories_on_hand_made_loglikelihoods(tmp_path, monkeypatch):
    write_mmlu(tmp_path)
    seen = []

    def table(prompt, conts):  # right for stem subjects, wrong elsewhere (every test answer is 0 = "A")
        subject = prompt.split("about ")[1].split(".\n")[0].replace(" ", "_")
        return [-1.0, -2.0, -3.0, -4.0] if mmlu.SUBJECT_CATEGORY[subject] == "stem" else [-2.0, -1.0, -3.0, -4.0]

    monkeypatch.setattr(mmlu, "score_choices", fake_scores(table, seen))
    result = mmlu.run_mmlu(ctx(tmp_path, options={"num_fewshot": 2}))
    assert result.metrics["acc"].value == pytest.approx(19 / 57) and result.metrics["acc"].n == 57
    assert result.metrics["acc/stem"].value == 1.0 and result.metrics["acc/stem"].n == 19
    for category, n in (("humanities", 13), ("social_sciences", 12), ("other", 13)):
        assert result.metrics[f"acc/{category}"].value == 0.0 and result.metrics[f"acc/{category}"].n == n
    assert result.settings["per_subject"]["anatomy"]["value"] == 1.0
    prompt, conts = seen[0][0][0]
    assert conts == [" A", " B", " C", " D"]
    assert prompt == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                      "dev 0 of abstract_algebra, with a comma?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
                      "dev 1 of abstract_algebra, with a comma?\nA. w\nB. x\nC. y\nD. z\nAnswer: B\n\n"
                      "test 0 of abstract_algebra, with a comma?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    limited = mmlu.run_mmlu(ctx(tmp_path, limit=10, seed=3))
    assert limited.metrics["acc"].n == 10 and len({s["subject"] for s in limited.samples}) == 10


# ------------------------------------------------------------------------------------------------ data access

@pytest.mark.parametrize("name", BENCHMARKS)
def test_no_hub_means_a_quick_clear_error(name, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(ll_mod, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(BenchmarkUnavailable, match="give --data-dir"):
        get_benchmark(name)(ctx(None))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_missing_local_files_are_reported(name, tmp_path):
    with pytest.raises(BenchmarkUnavailable, match="does not exist"):
        get_benchmark(name)(ctx(tmp_path))


# ------------------------------------------------------------------------------------------------ end to end

def check(result, name, n):
    assert set(result.metrics) >= METRICS[name]
    for metric in METRICS[name]:
        m = result.metrics[metric]
        assert m.n == n and 0.0 <= m.value <= 1.0
        assert m.ci_low - 1e-12 <= m.value <= m.ci_high + 1e-12  # Wilson bounds carry float rounding
    assert len(result.samples) == n
    for s in result.samples:
        assert {"prompt", "prompt_sha256", "choices", "gold", "loglikelihoods", "prediction", "correct"} <= set(s)
        assert len(s["loglikelihoods"]) == len(s["choices"])
        assert all(math.isfinite(x) and x < 0 for x in s["loglikelihoods"])
    if name != "truthfulqa_mc2":
        headline = "acc" if name.startswith(("mmlu", "arc")) else "mc1"
        assert result.metrics[headline].value == pytest.approx(sum(s["correct"] for s in result.samples) / n)
    else:
        assert result.metrics["mc2"].value == pytest.approx(sum(s["score"] for s in result.samples) / n)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_end_to_end_on_a_tiny_llama(name, tiny_tokenizer, make_llama, datasets_dir):
    result = get_benchmark(name)(EvalContext(make_llama(), tiny_tokenizer, data_dir=datasets_dir, limit=3,
                                             batch_size=4, max_length=96))
    check(result, name, 3)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_end_to_end_on_gpt2_with_another_tokenizer(name, gpt2_and_bpe, datasets_dir):
    model, tok = gpt2_and_bpe
    assert tok.pad_token_id is None
    # max_length None: the budget is GPT-2's own 80 positions, so long prompts must be left-truncated to fit
    result = get_benchmark(name)(EvalContext(model, tok, data_dir=datasets_dir, limit=3, batch_size=2))
    check(result, name, 3)
    assert result.settings["max_length"] == 80
