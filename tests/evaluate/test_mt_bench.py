import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from posttrain.evaluate.benchmarks import EvalContext, get_benchmark
from posttrain.evaluate.benchmarks import mt_bench
from posttrain.data.tokenize import render_prompt
from posttrain.evaluate.benchmarks.mt_bench import TEMPERATURES, load_questions, load_references
from posttrain.evaluate.generation import generate_until
from posttrain.evaluate.harness import BenchmarkUnavailable
from posttrain.evaluate.judge_parsing import checked_rating
from posttrain.evaluate.judges import (COMPARABLE, LOCAL_JUDGE_CAVEAT, NOT_GPT4, JudgeError, LocalJudge,
                                        OpenAICompatibleJudge, judge_from_options)
from posttrain.evaluate.stats import wilson_interval

run_mt_bench = get_benchmark("mt_bench")
SECRET = "sk-test-secret-0123456789"


class MockJudgeServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 whose reply is `policy(system, user)`."""

    def __init__(self, policy):
        self.policy, self.requests, self.status = policy, [], 200
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if server.status != 200:
                    self._send(server.status, {"error": f"boom; you sent {self.headers.get('Authorization')}"})
                    return
                system, user = body["messages"][0]["content"], body["messages"][1]["content"]
                reply = server.policy(system, user)
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    # urllib honours proxy variables; the mock lives on 127.0.0.1 and must be reached directly.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


MULTI = "<|The Start of Assistant A's Conversation with User|>"


def _ctx(model, tokenizer, datasets_dir, limit, **options):
    return EvalContext(model=model, tokenizer=tokenizer, data_dir=datasets_dir, limit=limit, seed=3, batch_size=16,
                       options={"max_new_tokens": 4, **options})


def test_single_mode_with_a_mock_endpoint_gives_exact_scores(make_llama, tiny_tokenizer, datasets_dir, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    questions = {q["question_id"]: q for q in load_questions(datasets_dir)}
    failing = questions[81]["turns"][0]  # every judgment of question 81 gets a reply without a rating

    def policy(system, user):
        if failing in user:
            return "I cannot decide. [[ten]]"
        return "Fine. Rating: [8.5]" if MULTI in user else "Good answer.\nRating: [[7]]"

    # Given answers keep this test about judging (generation is covered below): all 80 questions, fast.
    answers = {qid: [f"ANSWER-{qid}-1", f"ANSWER-{qid}-2"] for qid in questions}
    with MockJudgeServer(policy) as server:
        ctx = _ctx(make_llama(), tiny_tokenizer, datasets_dir, None, judge="openai:my-judge",
                   judge_base_url=server.base_url, answers=answers)
        result = run_mt_bench(ctx)

    # All 80 questions x 2 turns; question 81's two judgments fail and are excluded, the rest are exact.
    assert len(server.requests) == 160 and len(result.samples) == 160
    assert {r["path"] for r in server.requests} == {"/v1/chat/completions"}
    assert all(r["auth"] == f"Bearer {SECRET}" and r["temperature"] == 0 and r["max_tokens"] == 2048
               and r["model"] == "my-judge" and [m["role"] for m in r["messages"]] == ["system", "user"]
               for r in server.requests)
    assert result.settings["judge_failures"] == 2 and result.settings["judgments"] == 160
    assert result.metrics["score_turn1"].value == 7.0 and result.metrics["score_turn1"].n == 79
    assert result.metrics["score_turn2"].value == 8.5 and result.metrics["score_turn2"].n == 79
    assert result.metrics["score"].value == pytest.approx(7.75) and result.metrics["score"].n == 158
    # Ratings are constant within a turn, yet the turn means keep a width: Wilson on the mean rescaled to [0, 1].
    lo, hi = wilson_interval(79 * 6 / 9, 79)
    assert (result.metrics["score_turn1"].ci_low, result.metrics["score_turn1"].ci_high) == pytest.approx(
        (1 + 9 * lo, 1 + 9 * hi))

    failed = [s for s in result.samples if s["rating"] is None]
    assert {(s["question_id"], s["turn"]) for s in failed} == {(81, 1), (81, 2)}
    assert failed[0]["failure"] == "no [[rating]] in the judge output" and "[[ten]]" in failed[0]["judge_output"]

    references = load_references(datasets_dir)
    for sample, request in zip(result.samples, server.requests):
        assert set(sample) >= {"question_id", "category", "turn", "answer", "judge_prompt", "judge_output", "rating"}
        guided = sample["category"] in ("math", "reasoning", "coding")
        assert sample["judge_prompt"] == ("single-math-v1" if guided else "single-v1") + \
            ("-multi-turn" if sample["turn"] == 2 else "")
        if guided:
            assert references[sample["question_id"]][sample["turn"] - 1] in request["messages"][1]["content"]
        user = request["messages"][1]["content"]
        assert sample["answer"] == f"ANSWER-{sample['question_id']}-{sample['turn']}" and sample["answer"] in user
        if sample["turn"] == 2:  # turn 2 is judged on the whole conversation, turn 1 included
            assert f"ANSWER-{sample['question_id']}-1" in user
    assert sum(s["reference_guided"] for s in result.samples) == 60

    assert result.settings["judge"]["model"] == "my-judge" and result.settings["judge"]["gpt4_judged"] is False
    assert COMPARABLE in result.notes and NOT_GPT4 in result.notes
    assert SECRET not in json.dumps(result.settings) + json.dumps(result.notes) + json.dumps(result.samples)
    assert result.settings["temperatures"] == TEMPERATURES and result.settings["questions"] == 80
    assert result.settings["answers"] == "given"


def test_answers_follow_the_chat_template_and_category_temperatures(tiny_tokenizer, datasets_dir, monkeypatch):
    calls = []

    def scripted(model, tokenizer, contexts, **kw):
        calls.append((list(contexts), kw))
        turn = 2 if len(calls) > 3 else 1
        return [[f"  out{turn}-{len(calls)}-{i}  "] for i in range(len(contexts))]

    monkeypatch.setattr(mt_bench, "generate_until", scripted)
    questions = [q for q in load_questions(datasets_dir) if q["question_id"] in (81, 91, 101, 141)]
    answers, truncated = mt_bench.generate_answers(None, tiny_tokenizer, questions, max_new_tokens=5,
                                                   max_length=4096, batch_size=8, seed=10)
    # Per turn one call per temperature (0.0: reasoning; 0.1: stem; 0.7: writing, roleplay), greedy below 1e-4.
    assert [(kw["do_sample"], kw["temperature"] if kw["do_sample"] else None) for _, kw in calls] == \
        [(False, None), (True, 0.1), (True, 0.7)] * 2
    assert calls[1][1]["seed"] == 10 + 100 and calls[4][1]["seed"] == 10 + 1000 + 100
    assert all(kw["max_new_tokens"] == 5 and kw["add_special_tokens"] is False for _, kw in calls)
    writing = next(q for q in questions if q["question_id"] == 81)
    assert answers[81] == ["out1-3-0", "out2-6-0"] and not truncated  # stripped
    first = tiny_tokenizer.apply_chat_template([{"role": "user", "content": writing["turns"][0]}],
                                               add_generation_prompt=True, tokenize=False)
    second = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": writing["turns"][0]}, {"role": "assistant", "content": "out1-3-0"},
         {"role": "user", "content": writing["turns"][1]}], add_generation_prompt=True, tokenize=False)
    assert calls[2][0][0] == first and calls[5][0][0] == second


def test_pairwise_mode_judges_each_pair_twice_with_positions_swapped(make_llama, tiny_tokenizer, datasets_dir):
    baseline = {q["question_id"]: [f"BASELINE-{q['question_id']}-1", f"BASELINE-{q['question_id']}-2"]
                for q in load_questions(datasets_dir)}

    def policy(system, user):
        qid = int(re.search(r"BASELINE-(\d+)", user).group(1))
        baseline_is_a = user.index("BASELINE") < user.index("Start of Assistant B")
        if qid % 3 == 0:  # the model is better, wherever it sits
            return "[[B]]" if baseline_is_a else "[[A]]"
        if qid % 3 == 1:  # the baseline is better
            return "[[A]]" if baseline_is_a else "[[B]]"
        if qid == 83:
            return "no verdict at all"
        return "Position bias. [[A]]"  # inconsistent once swapped -> tie

    with MockJudgeServer(policy) as server:
        ctx = _ctx(make_llama(), tiny_tokenizer, datasets_dir, 6, judge="openai:gpt-4", judge_base_url=server.base_url,
                   mode="pairwise", baseline_answers=baseline, baseline_name="reference model")
        result = run_mt_bench(ctx)

    ids = result.settings["question_ids"]
    assert len(ids) == 6 and len(server.requests) == 6 * 2 * 2
    expected = {"win": 0, "loss": 0, "tie": 0, "error": 0}
    for qid in ids:
        kind = {0: "win", 1: "loss"}.get(qid % 3, "error" if qid == 83 else "tie")
        expected[kind] += 2  # both turns
    n = expected["win"] + expected["loss"] + expected["tie"]
    s = result.settings
    assert (s["wins"], s["losses"], s["ties"], s["errors"]) == (expected["win"], expected["loss"], expected["tie"],
                                                                 expected["error"])
    assert result.metrics["win_rate"].n == n
    assert result.metrics["win_rate"].value == pytest.approx(expected["win"] / n)
    assert result.metrics["win_rate_adjusted"].value == pytest.approx((expected["win"] + expected["tie"] / 2) / n)
    for sample in result.samples:
        assert sample["baseline_answer"] == baseline[sample["question_id"]][sample["turn"] - 1]
        assert len(sample["judge_output"]) == 2 and sample["judge_prompt"].startswith(("pair-v2", "pair-math-v1"))
    # gpt-4 named as the judge model: no "not GPT-4-judged" label, but still the same-judge caveat.
    assert s["judge"]["gpt4_judged"] is True and NOT_GPT4 not in result.notes and COMPARABLE in result.notes
    assert s["baseline"] == "reference model"


def test_tiny_local_model_as_answerer_and_judge(make_llama, tiny_tokenizer, datasets_dir):
    ctx = _ctx(make_llama(), tiny_tokenizer, datasets_dir, 3, judge="self", judge_max_new_tokens=6)
    result = run_mt_bench(ctx)
    s = result.settings
    assert s["judgments"] == 6 and len(result.samples) == 6
    parsed = [x["rating"] for x in result.samples if x["rating"] is not None]
    assert s["judge_failures"] == 6 - len(parsed)
    if parsed:  # a random model rarely writes a rating; whatever it wrote is averaged over exactly those
        assert result.metrics["score"].n == len(parsed)
    else:  # nothing parsed: no number at all, and the report says so
        assert "score" not in result.metrics and "score" in s["not_measured"]
        assert any(note.startswith("not measured") for note in result.notes)
    assert s["judge"]["kind"] == "local" and s["judge"]["gpt4_judged"] is False and NOT_GPT4 in result.notes
    # The judge prompts are far longer than the tiny model's 256 positions: the cut is counted and reported.
    assert s["judge"]["prompts_truncated"] == 6
    assert all(x["judge_prompt"].startswith("single-") for x in result.samples)


def test_mock_endpoint_judges_the_answers_the_model_generated(make_llama, tiny_tokenizer, datasets_dir,
                                                              monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    model = make_llama()
    subset = mt_bench.subsample(load_questions(datasets_dir), 5, 3)
    failing = subset[0]["turns"][0]  # both judgments of the first question get a reply without a rating

    def policy(system, user):
        if failing in user:
            return "No idea."
        return "Rating: [[4]]" if MULTI in user else "Rating: [[9]]"

    with MockJudgeServer(policy) as server:
        assert server.httpd.server_address[0] == "127.0.0.1"
        result = run_mt_bench(_ctx(model, tiny_tokenizer, datasets_dir, 5, judge="openai:mock-judge",
                                   judge_base_url=server.base_url, max_new_tokens=5))
    s = result.settings
    assert s["answers"] == "generated" and s["chat_template"] is True
    assert s["question_ids"] == [q["question_id"] for q in subset]
    # What was judged is what the model generated: greedy or seeded, so generating again gives the same answers.
    expected, _ = mt_bench.generate_answers(model, tiny_tokenizer, subset, max_new_tokens=5, max_length=256,
                                            batch_size=16, seed=3)
    assert len(server.requests) == 10 and len(result.samples) == 10
    for sample, request in zip(result.samples, server.requests):
        answer = expected[sample["question_id"]][sample["turn"] - 1]
        assert sample["answer"] == answer and answer in request["messages"][1]["content"]
    assert s["judge_failures"] == 2 and s["judge_failure_reasons"] == {"no [[rating]] in the judge output": 2}
    assert [(x["question_id"], x["turn"]) for x in result.samples if x["rating"] is None] == \
        [(subset[0]["question_id"], 1), (subset[0]["question_id"], 2)]
    t1, t2, score = result.metrics["score_turn1"], result.metrics["score_turn2"], result.metrics["score"]
    # Ratings in [1, 10]: the interval is Wilson's on the mean rescaled to [0, 1] with n items, mapped back.
    def rescaled(mean, n):
        lo, hi = wilson_interval(n * (mean - 1) / 9, n)
        return pytest.approx((1 + 9 * lo, 1 + 9 * hi))

    assert (t1.value, t1.n) == (9.0, 4) and (t1.ci_low, t1.ci_high) == rescaled(9.0, 4)
    assert (t2.value, t2.n) == (4.0, 4) and (t2.ci_low, t2.ci_high) == rescaled(4.0, 4)
    assert score.value == 6.5 and score.n == 8 and (score.ci_low, score.ci_high) == rescaled(6.5, 8)
    assert s["judge"]["kind"] == "openai-compatible" and s["judge"]["model"] == "mock-judge"
    assert s["judge"]["base_url"] == server.base_url and "judge: openai-compatible mock-judge" in result.notes


def test_gpt2_with_its_own_bpe_and_chat_template_answers_and_judges_itself(gpt2_chat, datasets_dir):
    model, tok = gpt2_chat
    assert tok.pad_token_id is None and tok.chat_template
    # max_length None: the budget is GPT-2's own 80 positions, for the answers and for the self judge
    ctx = EvalContext(model=model, tokenizer=tok, data_dir=datasets_dir, limit=4, seed=3, batch_size=4,
                      options={"max_new_tokens": 6, "judge": "self", "judge_max_new_tokens": 8})
    result = run_mt_bench(ctx)
    s = result.settings
    assert (s["mode"], s["answers"], s["chat_template"], s["questions"], s["of"]) == \
        ("single", "generated", True, 4, 80)
    subset = mt_bench.subsample(load_questions(datasets_dir), 4, 3)
    assert s["question_ids"] == [q["question_id"] for q in subset]
    assert s["judgments"] == 8 and [(x["question_id"], x["turn"]) for x in result.samples] == \
        [(q["question_id"], t) for q in subset for t in (1, 2)]
    for x in result.samples:
        assert {"question", "answer", "judge_prompt", "judge_output", "rating", "failure"} <= set(x)
        assert (x["rating"], x["failure"]) == checked_rating(x["judge_output"])

    # The turn-1 answers of the greedy categories, generated again from the chat-template rendering as one batch.
    greedy = [q for q in subset if TEMPERATURES[q["category"]] == 0.0]
    assert greedy
    contexts = [render_prompt(tok, [{"role": "user", "content": q["turns"][0]}]) for q in greedy]
    assert all(c.startswith("user: ") and c.endswith("assistant:") for c in contexts)
    again = generate_until(model, tok, contexts, until=[], max_new_tokens=6, max_length=80, batch_size=4,
                           add_special_tokens=False)
    by_id = {(x["question_id"], x["turn"]): x["answer"] for x in result.samples}
    assert [by_id[(q["question_id"], 1)] for q in greedy] == [o[0].strip() for o in again]

    # Failed parses are excluded and counted; whatever parsed is averaged over exactly those.
    parsed = [x["rating"] for x in result.samples if x["rating"] is not None]
    assert s["judge_failures"] == 8 - len(parsed) == sum(s["judge_failure_reasons"].values())
    if parsed:
        assert result.metrics["score"].n == len(parsed)
        assert result.metrics["score"].value == pytest.approx(sum(parsed) / len(parsed))
    else:
        assert result.metrics == {} and s["not_measured"] == ["score", "score_turn1", "score_turn2"]
    # The judge is recorded: the model itself, its size, its context, and the caveats in the notes.
    judge = s["judge"]
    assert (judge["kind"], judge["model"], judge["gpt4_judged"], judge["max_length"]) == \
        ("local", "self (the evaluated model)", False, 80)
    assert judge["parameters"] == sum(p.numel() for p in model.parameters())
    assert judge["prompts_truncated"] == 8  # every judge prompt is longer than 80 tokens
    assert "judge: local self (the evaluated model)" in result.notes and COMPARABLE in result.notes
    assert NOT_GPT4 in result.notes
    assert f"local judge with {judge['parameters']:,} parameters: {LOCAL_JUDGE_CAVEAT}" in result.notes


def test_pairwise_with_a_second_local_model(make_llama, tiny_tokenizer, datasets_dir):
    ctx = _ctx(make_llama(0), tiny_tokenizer, datasets_dir, 2, judge="self", judge_max_new_tokens=4,
               mode="pairwise", baseline_model=make_llama(1))
    result = run_mt_bench(ctx)
    s = result.settings
    assert s["pairs"] == 4 and s["wins"] + s["losses"] + s["ties"] + s["errors"] == 4
    assert ("win_rate" in result.metrics) == (s["errors"] < 4)


def test_without_a_judge_or_data_the_benchmark_is_unavailable(tiny_model, tiny_tokenizer, datasets_dir, tmp_path):
    with pytest.raises(BenchmarkUnavailable, match="needs a judge"):
        run_mt_bench(_ctx(tiny_model, tiny_tokenizer, datasets_dir, 1))
    with pytest.raises(BenchmarkUnavailable, match="question.jsonl"):
        run_mt_bench(_ctx(tiny_model, tiny_tokenizer, tmp_path, 1, judge="self"))


def test_http_failures_raise_clear_errors_without_the_key(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", SECRET)
    with MockJudgeServer(lambda s, u: "[[5]]") as server:
        judge = OpenAICompatibleJudge(server.base_url, "m", api_key_env="MY_JUDGE_KEY", timeout=5, max_retries=1,
                                      retry_wait=0.0)
        assert judge.complete("sys", "user") == "[[5]]"
        server.status = 401
        with pytest.raises(JudgeError) as info:
            judge.complete("sys", "user")
        assert "HTTP 401" in str(info.value) and "$MY_JUDGE_KEY" in str(info.value) and SECRET not in str(info.value)
        server.status = 503
        before = len(server.requests)
        with pytest.raises(JudgeError, match="HTTP 503"):
            judge.complete("sys", "user")
        assert len(server.requests) - before == 2  # one retry for a transient status
    closed = OpenAICompatibleJudge(server.base_url, "m", timeout=2, max_retries=0)
    with pytest.raises(JudgeError, match="could not be reached"):
        closed.complete("sys", "user")


def test_judge_selection(make_llama, tiny_tokenizer, tmp_path):
    model = make_llama()
    model.save_pretrained(tmp_path / "judge")
    tiny_tokenizer.save_pretrained(tmp_path / "judge")
    judge = judge_from_options({"judge": f"local:{tmp_path / 'judge'}", "judge_max_new_tokens": 3}, model,
                               tiny_tokenizer)
    assert isinstance(judge, LocalJudge) and judge.max_new_tokens == 3
    assert isinstance(judge.complete("You judge.", "Rate 2 + 2 = 4."), str)
    assert judge.describe()["model"] == str(tmp_path / "judge") and NOT_GPT4 in judge.describe()["notes"]
    remote = judge_from_options({"judge": "openai:gpt-4o", "judge_base_url": "http://127.0.0.1:9/v1/"}, model,
                                tiny_tokenizer)
    assert isinstance(remote, OpenAICompatibleJudge) and remote.url == "http://127.0.0.1:9/v1/chat/completions"
    assert judge_from_options({}, model, tiny_tokenizer) is None
    with pytest.raises(ValueError, match="unknown judge"):
        judge_from_options({"judge": "gpt4"}, model, tiny_tokenizer)
