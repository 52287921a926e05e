"""The watchdog, driven by a fake clock: silent agents become suspect then unhealthy; frozen progress is a hang."""

import pytest

from posttrain.bus.bus import Bus
from posttrain.bus.events import make_event
from posttrain.bus.health import HealthOptions, Watchdog
from posttrain.bus.log import EventLog


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def setup(tmp_path):
    log = EventLog(tmp_path / "e.sqlite")
    bus = Bus(log, "r1")
    box = bus.register("coordinator")
    clock = FakeClock()
    dog = Watchdog(bus, HealthOptions(suspect_after_s=3, dead_after_s=6, stall_after_s=10), clock=clock)
    yield bus, box, clock, dog
    log.close()


def beat(bus, agent, state="busy", step=0, task="t1"):
    bus.publish(make_event("agent.heartbeat.v1", agent, "r1", {"agent": agent, "state": state, "task_id": task,
                                                               "progress": {"stage": "train", "step": step}}))


def test_silent_agent_goes_suspect_then_unhealthy_once_each(setup):
    bus, box, clock, dog = setup
    beat(bus, "trainer")
    clock.now = 2.9
    assert dog.check() == []
    clock.now = 3.0
    assert [(a, h) for a, h, _ in dog.check()] == [("trainer", "suspect")]
    assert dog.check() == []  # published once
    clock.now = 6.5
    changes = dog.check()
    assert [(a, h) for a, h, _ in changes] == [("trainer", "unhealthy")]
    assert "no heartbeat for 6.5 s" in changes[0][2]
    health = [box.get(timeout=1) for _ in range(2)]
    assert [e.data["health"] for e in health] == ["suspect", "unhealthy"]
    assert all(e.type == "agent.health.v1" and e.target == "coordinator" for e in health)


def test_beating_but_frozen_progress_is_a_hang(setup):
    bus, box, clock, dog = setup
    changes_at = {}
    for t in range(0, 12):
        clock.now = float(t)
        beat(bus, "trainer", step=3)
        changes_at[t] = dog.check()
    assert all(changes_at[t] == [] for t in range(10)) and changes_at[11] == []
    changes = changes_at[10]
    assert changes[0][1] == "unhealthy" and "no progress" in changes[0][2] and "t1" in changes[0][2]


def test_progress_keeps_a_slow_agent_healthy_and_idle_agents_may_be_still(setup):
    bus, box, clock, dog = setup
    for t in range(0, 30):
        clock.now = float(t)
        beat(bus, "trainer", step=t)
        beat(bus, "selector", state="idle", task=None)
        assert dog.check() == []


def test_suspect_recovers_when_beats_resume(setup):
    bus, box, clock, dog = setup
    beat(bus, "trainer", step=1)
    clock.now = 4.0
    dog.check()
    beat(bus, "trainer", step=2)
    assert [(a, h) for a, h, _ in dog.check()] == [("trainer", "healthy")]
