"""The bus: log before delivery, per-agent order, routing, request/reply deadlines, idempotent log."""

import sqlite3
import threading

import pytest

from posttrain.bus.bus import Bus, RequestTimeout
from posttrain.bus.envelope import Envelope
from posttrain.bus.events import make_event
from posttrain.bus.log import EventLog, read_events


def _note(source, text, run_id="r1", **kw):
    return make_event("run.note.v1", source, run_id, {"level": "info", "text": text}, **kw)


@pytest.fixture
def bus(tmp_path):
    log = EventLog(tmp_path / "events.sqlite")
    yield Bus(log, "r1")
    log.close()


def test_event_is_committed_before_it_is_delivered(bus, tmp_path):
    box = bus.register("a")
    seen_in_log = []

    def check(seq, env):
        # An independent read-only connection already sees the row when observers/mailboxes get it.
        seen_in_log.append(any(e.envelope.id == env.id for e in read_events(tmp_path / "events.sqlite")))

    bus.observe(check)
    env = _note("x", "hello", target="a")
    bus.publish(env)
    assert seen_in_log == [True]
    assert box.get(timeout=1).id == env.id


def test_mailbox_preserves_order_and_routes_by_target_and_subscription(bus):
    a, b = bus.register("a"), bus.register("b")
    bus.subscribe("b", "run.note")
    sent = [_note("x", str(i), target="a") for i in range(20)]
    for env in sent:
        bus.publish(env)
    assert [a.get(timeout=1).data["text"] for _ in range(20)] == [str(i) for i in range(20)]
    assert [b.get(timeout=1).data["text"] for _ in range(20)] == [str(i) for i in range(20)]
    # A subscriber does not receive its own events.
    bus.publish(_note("b", "mine"))
    assert b.get(timeout=0.05) is None


def test_unknown_type_and_bad_payload_are_refused_before_logging(bus, tmp_path):
    with pytest.raises(ValueError, match="unknown event type"):
        bus.publish(Envelope(type="made.up.v1", source="x", topic="made", run_id="r1"))
    with pytest.raises(ValueError):
        bus.publish(Envelope(type="run.note.v1", source="x", topic="run", run_id="r1", data={"level": "loud"}))
    assert read_events(tmp_path / "events.sqlite") == []


def test_unknown_target_is_an_error_and_nothing_is_logged(bus, tmp_path):
    with pytest.raises(ValueError, match="unknown agent"):
        bus.publish(_note("x", "hi", target="nobody"))
    assert read_events(tmp_path / "events.sqlite") == []


def test_many_publishers_deliver_in_log_order(bus, tmp_path):
    import random
    import time

    box = bus.register("sink")
    bus.subscribe("sink", "run.note")
    bus.observe(lambda seq, env: time.sleep(random.random() / 2000))  # widen any race window

    def publish(tag):
        for i in range(100):
            bus.publish(_note(f"p{tag}", f"{tag}-{i}"))

    threads = [threading.Thread(target=publish, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    delivered = [box.get(timeout=1).id for _ in range(400)]
    logged = [e.envelope.id for e in read_events(tmp_path / "events.sqlite")]
    assert delivered == logged


def test_a_run_finishes_once(bus, tmp_path):
    from posttrain.bus.events import make_event

    first = make_event("run.finished.v1", "coordinator", "r1", {"status": "succeeded", "error": None})
    second = make_event("run.finished.v1", "runner", "r1", {"status": "failed", "error": {
        "agent": "runner", "task": None, "reason": "late"}})
    assert bus.publish(first) == 1 and bus.publish(second) is None
    assert [e.envelope.id for e in read_events(tmp_path / "events.sqlite")] == [first.id]


def test_request_reply_resolves_by_causation_and_keeps_correlation(bus):
    box = bus.register("server")

    def serve():
        req = box.get(timeout=2)
        bus.publish(req.reply("run.note.v1", "server", {"level": "info", "text": "pong"}))

    threading.Thread(target=serve).start()
    req = _note("client", "ping", target="server", correlation_id="flow-1")
    reply = bus.request(req, timeout=2)
    assert reply.causation_id == req.id and reply.correlation_id == "flow-1" and reply.data["text"] == "pong"


def test_request_times_out_at_its_deadline(bus):
    bus.register("silent")
    with pytest.raises(RequestTimeout, match="within 0.1 s"):
        bus.request(_note("client", "ping", target="silent"), timeout=0.1)


def test_log_is_idempotent_on_event_id_and_uses_wal(tmp_path):
    log = EventLog(tmp_path / "e.sqlite")
    env = _note("x", "once")
    assert log.append(env) == log.append(env) == 1
    assert len(log.read()) == 1
    assert log._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # while it is written
    log.close()


def _log_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("e.sqlite"))


def test_a_closed_log_is_one_file_and_reading_it_later_creates_no_wal_files(tmp_path):
    # Regression: finished runs kept events.sqlite-wal and -shm: the writer removed them on close, and the first
    # read-only reader after it (the report) made them again and, being read-only, could not remove them.
    log = EventLog(tmp_path / "e.sqlite")
    log.append(_note("x", "one"))
    assert _log_files(tmp_path) == ["e.sqlite", "e.sqlite-shm", "e.sqlite-wal"]
    log.close()
    assert _log_files(tmp_path) == ["e.sqlite"]
    assert [e.envelope.data["text"] for e in read_events(tmp_path / "e.sqlite")] == ["one"]
    assert _log_files(tmp_path) == ["e.sqlite"]
    assert sqlite3.connect(tmp_path / "e.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_close_waits_for_a_reader_holding_the_log_open_then_leaves_one_file(tmp_path):
    log = EventLog(tmp_path / "e.sqlite")
    log.append(_note("x", "one"))
    reader = sqlite3.connect(f"file:{tmp_path / 'e.sqlite'}?mode=ro", uri=True,  # e.g. another process watching
                             check_same_thread=False)
    assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)
    threading.Timer(0.2, reader.close).start()
    log.close()  # retries leaving WAL mode until the reader has gone
    assert _log_files(tmp_path) == ["e.sqlite"]


def test_close_with_a_reader_that_stays_keeps_every_event(tmp_path, monkeypatch):
    monkeypatch.setattr("posttrain.bus.log.CLOSE_SWITCH_S", 0.05)
    log = EventLog(tmp_path / "e.sqlite")
    log.append(_note("x", "one"))
    reader = sqlite3.connect(f"file:{tmp_path / 'e.sqlite'}?mode=ro", uri=True)
    reader.execute("SELECT count(*) FROM events").fetchone()
    log.close()  # the switch cannot happen: closed in WAL mode, complete
    assert [e.envelope.data["text"] for e in read_events(tmp_path / "e.sqlite")] == ["one"]
    reader.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.append(_note("x", "two"))


def test_log_columns_match_the_contract(tmp_path):
    log = EventLog(tmp_path / "e.sqlite")
    log.append(_note("x", "hi"))
    log.close()
    cols = [r[1] for r in sqlite3.connect(tmp_path / "e.sqlite").execute("PRAGMA table_info(events)")]
    for required in ("seq", "id", "type", "source", "target", "topic", "subject", "time", "correlation_id",
                     "causation_id", "data"):
        assert required in cols


def test_event_type_must_be_dotted_and_versioned():
    with pytest.raises(ValueError, match="dotted and versioned"):
        Envelope(type="note", source="x", topic="t", run_id="r")
