"""`posttrain show` and `posttrain runs`, read from logs only."""

from posttrain.timeline import format_timeline, list_runs

from runlogs import RUN_ID, T0, Writer, failed_run, interrupted_run, start, successful_run


def test_timeline_lines_and_summary(tmp_path):
    text = format_timeline(successful_run(tmp_path / "r"))
    lines = text.splitlines()
    assert "heartbeat" not in text
    assert "[  4.0s] task.assigned.v1  coordinator -> trainer  stage=train" in lines
    assert f"run {RUN_ID}: succeeded in 20.0s" in lines
    assert "method: grpo (verifiable answers)" in lines
    assert "stages: data=succeeded 1.5s  select=succeeded 0.5s  train=succeeded 5.0s  compress=succeeded 2.0s  " \
           "evaluate=succeeded 6.0s" in lines
    assert "accuracy: base 0.300 (n=50, answered 40) -> aligned 0.500 (n=50, answered 50) -> compressed 0.480 (n=50, answered 49)" in lines


def test_timeline_of_a_failed_run(tmp_path):
    text = format_timeline(failed_run(tmp_path / "f"))
    assert "accuracy: base 0.250 (n=40) -> aligned not measured -> compressed not measured" in text
    assert "error: trainer (task t-train): out of memory after 3 attempts" in text


def test_list_runs(tmp_path):
    runs = tmp_path / "runs"
    failed_run(runs / "b-failed")
    successful_run(runs / "a-ok")
    interrupted_run(runs / "e-stopped")
    (runs / "empty-dir").mkdir()
    w = Writer(runs / "c-live", run_id="run-live")
    start(w)
    (runs / "d-broken").mkdir()
    (runs / "d-broken" / "events.sqlite").write_text("not a database")
    listed = list_runs(runs)
    w.close()
    by_id = {r["run_id"]: r for r in listed}
    assert set(by_id) == {RUN_ID, "run-failed", "run-live", "d-broken", "run-interrupted"}
    assert by_id["run-interrupted"]["status"] == "interrupted"  # its report says "failed"; the listing says why
    assert by_id[RUN_ID] == {"run_id": RUN_ID, "dir": str(runs / "a-ok"), "status": "succeeded", "method": "grpo",
                             "started_at": T0, "wall_s": 20.0}
    assert by_id["run-failed"]["status"] == "failed" and by_id["run-failed"]["wall_s"] == 7.0
    assert by_id["run-live"]["status"] == "running" and by_id["run-live"]["wall_s"] is None
    assert by_id["d-broken"]["status"] == "unreadable"
    assert list_runs(tmp_path / "no-such-dir") == []
