"""The terminal views: plain lines, the rich frame, the polling loop and mode choice."""

import io
import threading
import time

from rich.console import Console

from posttrain.live.terminal import LiveView, choose_mode, sparkline

from runlogs import RUN_ID, Writer, failed_run, start, successful_run


def console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def text_of(c: Console) -> str:
    return c.file.getvalue()


def test_plain_prints_one_line_per_event_without_heartbeats(tmp_path):
    run = successful_run(tmp_path / "r")
    c = Console(file=io.StringIO(), width=80)  # narrower than the lines: they must not be wrapped
    view = LiveView(run / "events.sqlite", "plain", console=c)
    new = view.poll()
    lines = text_of(c).splitlines()
    beats = sum(e.envelope.type == "agent.heartbeat.v1" for e in new)
    assert beats > 0 and len(lines) == len(new) - beats
    # A long path keeps its informative end.
    assert lines[0].startswith("[  0.0s] run.started.v1  coordinator -> *  run_dir=…") and lines[0].endswith("/r")
    assert "[  4.0s] task.assigned.v1  coordinator -> trainer  stage=train" in lines
    # headline metrics first, whatever order the log stored them in
    assert "[  4.6s] train.metrics.v1  trainer -> *  step=1/4  loss=2  reward=0.1  kl=0  grad_norm=1" in lines
    assert "[ 18.0s] eval.result.v1  evaluator -> *  model=aligned  metric=exact_match  value=0.5  n=50  answered=50" in lines
    assert lines[-1] == "[ 20.0s] run.finished.v1  coordinator -> *  status=succeeded"
    assert not any("heartbeat" in line for line in lines)


def test_plain_failed_run_shows_the_error(tmp_path):
    c = console()
    view = LiveView(failed_run(tmp_path / "f"), "plain", console=c)  # a run directory works too
    view.poll()
    out = text_of(c)
    assert "[  6.0s] task.failed.v1  trainer -> coordinator  stage=train  reason=out of memory  attempts=3" in out
    assert "status=failed  error=trainer: out of memory after 3 attempts" in out


def test_poll_returns_only_new_events_and_tolerates_a_missing_log(tmp_path):
    view = LiveView(tmp_path / "r" / "events.sqlite", "quiet", console=console())
    assert view.poll() == []
    w = Writer(tmp_path / "r")
    start(w)
    first = view.poll()
    assert [e.envelope.type for e in first][:2] == ["run.started.v1", "agent.started.v1"]
    assert view.poll() == []
    w.emit(1.0, "stage.started.v1", "coordinator", {"stage": "data", "task_id": "t", "agent": "data"})
    again = view.poll()
    assert [e.envelope.type for e in again] == ["stage.started.v1"]
    w.close()
    assert text_of(view.console) == ""  # quiet prints nothing


def test_rich_frame_has_agents_messages_and_sparklines(tmp_path):
    c = console()
    view = LiveView(successful_run(tmp_path / "r"), "rich", console=c)
    view.poll()
    c.print(view.render())
    out = text_of(c)
    for name in ("coordinator", "trainer", "data", "compressor", "evaluator"):
        assert name in out
    assert RUN_ID in out and "SUCCEEDED" in out and "elapsed 20.0s" in out
    assert "suspect" in out and "slow beat" in out
    assert "run.finished.v1" in out and "evaluator → coordinator" in out
    assert "result=[ok]" in out  # logged text is not parsed as rich markup
    assert sparkline([2.0, 1.5, 1.2, 1.0]) in out and "▁" in out
    assert "loss" in out and "reward" in out and "kl" in out
    assert "base       0.300 (n=50" in out and "compressed int8" in out


def test_rich_frame_of_a_failed_run_shows_the_error(tmp_path):
    c = console()
    view = LiveView(failed_run(tmp_path / "f"), "rich", console=c)
    view.poll()
    c.print(view.render())
    out = text_of(c)
    assert "FAILED" in out and "trainer (task t-train): out of memory after 3 attempts" in out
    assert "aligned    not measured" in out


def test_rich_frame_before_any_event_and_mid_training(tmp_path):
    c = console()
    view = LiveView(tmp_path / "nothing" / "events.sqlite", "rich", console=c)
    c.print(view.render())
    assert "waiting for the log" in text_of(c) and "no training metrics yet" in text_of(c)
    w = Writer(tmp_path / "r")
    start(w)
    w.heartbeat(1.0, "trainer", "busy", "t-train", "train", 3, 10)
    w.close()
    c2 = console()
    view2 = LiveView(tmp_path / "r", "rich", console=c2)
    view2.poll()
    c2.print(view2.render(now=view2.state.started_at + 2.0))
    out = text_of(c2)
    assert "busy" in out and "3/10" in out and "1.0s ago" in out and "RUNNING" in out


def test_sparkline_shapes():
    assert sparkline([]) == ""
    assert sparkline([1, 2, 3]) == "▁▅█"
    assert sparkline([5, 5]) == "▄▄"
    assert sparkline([1, float("nan"), 3]) == "▁×█"
    assert len(sparkline(range(1000), width=20)) == 20
    assert sparkline(range(1000), width=20)[0] == "▁" and sparkline(range(1000), width=20)[-1] == "█"


def _write_run_slowly(run_dir, delay):
    w = Writer(run_dir)
    start(w)
    time.sleep(delay)
    w.emit(2.0, "stage.started.v1", "coordinator", {"stage": "data", "task_id": "t", "agent": "data"})
    time.sleep(delay)
    w.emit(3.0, "run.finished.v1", "coordinator", {"status": "succeeded"})
    w.close()


def test_run_until_finished_follows_a_live_writer(tmp_path):
    for mode in ("rich", "plain"):
        run_dir = tmp_path / mode
        writer = threading.Thread(target=_write_run_slowly, args=(run_dir, 0.3))
        c = console()
        view = LiveView(run_dir / "events.sqlite", mode, console=c, refresh_s=0.05)
        writer.start()
        finished = view.run_until_finished(timeout_s=10)
        writer.join()
        assert finished and view.state.status == "succeeded"
        out = text_of(c)
        assert "run.finished.v1" in out and "stage.started.v1" in out
        if mode == "plain":
            assert out.splitlines()[-1] == f"run {RUN_ID} succeeded after 3.0s"


def test_run_until_finished_stops_on_event_and_timeout(tmp_path):
    w = Writer(tmp_path / "r")
    start(w)
    stop = threading.Event()
    view = LiveView(tmp_path / "r", "rich", console=console(), refresh_s=0.05)
    threading.Timer(0.2, stop.set).start()
    t = time.monotonic()
    assert view.run_until_finished(stop_event=stop, timeout_s=10) is False
    assert time.monotonic() - t < 5
    assert "coordinator" in text_of(view.console)  # the final frame was drawn
    view2 = LiveView(tmp_path / "r", "quiet", console=console(), refresh_s=0.05)
    assert view2.run_until_finished(timeout_s=0.2) is False and view2.state.status == "running"
    w.close()


class _Stream:
    def __init__(self, tty):
        self.tty = tty

    def isatty(self):
        return self.tty


def test_choose_mode():
    assert choose_mode(quiet=True, plain=True, stream=_Stream(True)) == "quiet"
    assert choose_mode(quiet=False, plain=True, stream=_Stream(True)) == "plain"
    assert choose_mode(quiet=False, plain=False, stream=_Stream(True)) == "rich"
    assert choose_mode(quiet=False, plain=False, stream=_Stream(False)) == "plain"
    assert choose_mode(quiet=False, plain=False, stream=io.StringIO()) == "plain"


def test_finish_drains_what_the_loop_had_not_read_before_the_closing_line(tmp_path):
    """A Ctrl-C breaks the loop at some step; events logged after its last poll (the trainer kept going until it
    was stopped) must still be printed, in order, before the closing line."""
    w = Writer(tmp_path / "r")
    start(w)
    c = Console(file=io.StringIO(), width=200)
    view = LiveView(tmp_path / "r", "plain", console=c)
    view.poll()  # the loop's last read
    for step in (13, 14, 15):
        w.emit(1.0 + step / 100, "train.metrics.v1", "trainer", {"method": "sft", "step": step, "total_steps": 20,
                                                                 "metrics": {"loss": 1.0}})
    w.emit(1.5, "run.finished.v1", "runner", {"status": "failed", "interrupted": "SIGINT", "error": {
        "agent": "runner", "task": None, "reason": "interrupted by the user (Ctrl-C)"}})
    w.close()
    view.finish()
    lines = text_of(c).splitlines()
    assert [line.split("  ")[-2] for line in lines if "train.metrics.v1" in line] == [
        "step=13/20", "step=14/20", "step=15/20"]
    assert lines[-2].startswith("[  1.5s] run.finished.v1  runner -> *  status=failed  error=runner: interrupted")
    assert lines[-1] == f"run {RUN_ID} failed after 1.5s"


def test_rich_loop_ends_with_one_final_frame_of_the_drained_log(tmp_path):
    w = Writer(tmp_path / "r")
    start(w)
    stop = threading.Event()
    stop.set()
    c = console()
    view = LiveView(tmp_path / "r", "rich", console=c, refresh_s=0.05)
    view.run_until_finished(stop_event=stop, final=False)
    w.emit(2.0, "stage.started.v1", "coordinator", {"stage": "data", "task_id": "t", "agent": "data"})
    w.emit(3.0, "run.finished.v1", "coordinator", {"status": "succeeded"})
    w.close()
    before = len(text_of(c))
    view.finish()
    final = text_of(c)[before:]
    assert "SUCCEEDED" in final and "run.finished.v1" in final and final.count("message flow") == 1


def _agent_rows(out):
    return {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") >= 7 and line.split("│")[1].strip()
            in ("coordinator", "data", "trainer")}


def test_a_finished_run_shows_the_agents_final_states_and_no_heartbeat_age(tmp_path):
    """`watch` on a finished run: the last beats were logged as the agents stopped, after the run's end, which
    read as "beat -0.1s ago"; the watchdog logs only changes, so every health read "unknown"."""
    from runlogs import interrupted_run

    c = Console(file=io.StringIO(), width=160)
    view = LiveView(interrupted_run(tmp_path / "i"), "rich", console=c)
    view.poll()
    c.print(view.render())
    out = text_of(c)
    rows = _agent_rows(out)
    assert rows["coordinator"] == ["stopped", "-", "", "", "-"]
    assert rows["trainer"] == ["stopped", "-", "train", "train ██░░░░░░░░ 2/10", "-"]  # where it stopped
    assert "ago" not in out and "unknown" not in out
    assert "■ train 3.0s" in out and "FAILED" in out


def test_a_running_runs_beat_age_is_never_negative(tmp_path):
    w = Writer(tmp_path / "r")
    start(w)
    w.heartbeat(2.0, "trainer", "busy", "t-train", "train", 1, 10)
    w.close()
    c = Console(file=io.StringIO(), width=160)
    view = LiveView(tmp_path / "r", "rich", console=c)
    view.poll()
    c.print(view.render(now=view.state.started_at + 1.9))  # a beat stamped a hair after the reader's clock
    rows = _agent_rows(text_of(c))
    assert rows["trainer"][4] == "0.0s ago" and rows["coordinator"][4] == "1.4s ago"
    assert rows["trainer"][1] == "unknown"  # a live run's health stays what the log says (nothing yet)
