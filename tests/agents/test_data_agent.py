"""The data agent's profile records the rows preparation dropped, for the training and the evaluation data."""

import json
from types import SimpleNamespace

from posttrain.agents.data import DataAgent
from posttrain.config import RunConfig


class Ctx:
    """Records what the agent publishes; progress is ignored."""

    def __init__(self):
        self.published = []

    def progress(self, *args, **kwargs):
        pass

    def publish(self, type, data, **kwargs):
        self.published.append((type, data))


def _pairs(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_dropped_rows_of_training_and_evaluation_data_are_in_the_profile(tmp_path):
    # Regression: a separate evaluation file's dropped rows were counted and then discarded.
    good = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(4)]
    train = _pairs(tmp_path / "train.jsonl", good + [{"prompt": "p", "chosen": "same", "rejected": "same"}])
    evald = _pairs(tmp_path / "eval.jsonl", good[:2] + [{"prompt": "p", "chosen": "", "rejected": "no"}])
    config = RunConfig(data=train, data_options={"eval_data": evald, "drop_empty": True})
    ctx = Ctx()
    result = DataAgent(config, tmp_path / "run").handle(SimpleNamespace(type="task.assigned.v1"), ctx)
    profile = result["profile"]
    assert (profile["rows"], profile["dropped"]) == (4, {"identical_pair": 1})
    assert (profile["eval_rows"], profile["eval_dropped"]) == (2, {"empty_response": 1})
    assert ctx.published == [("data.profiled.v1", {"source": train, "kind": "preference", "rows": 4,
                                                   "profile": profile})]


def test_a_hold_out_records_no_separate_evaluation_drops(tmp_path):
    good = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(6)]
    config = RunConfig(data=_pairs(tmp_path / "train.jsonl", good), data_options={"eval_size": 2})
    result = DataAgent(config, tmp_path / "run").handle(SimpleNamespace(type="task.assigned.v1"), Ctx())
    assert result["profile"]["dropped"] == {} and "eval_dropped" not in result["profile"]
