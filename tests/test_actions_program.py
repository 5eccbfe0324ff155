"""Program actions: real subprocesses (the running Python) fed the transition as JSON on stdin."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path

from gpiozero.pins.mock import MockFactory

from gateway.actions import ActionController, ActuatorEvent, parse_actions
from gateway.clock import SystemClock
from gateway.rules.levels import Level, Transition, TransitionKind

RULES = ["gas.lel1", "gas.lel2", "res.zu"]
T0 = 1_752_537_600_000


def transition(kind: TransitionKind, old: Level, new: Level, rule: str = "gas.lel1", **values) -> Transition:
    return Transition(kind, rule, old, new, T0, {3: Decimal("51.5"), **values}, f"{rule}: {old.name} → {new.name}")


RAISED = transition(TransitionKind.RAISED, Level.NONE, Level.II_ORANGE)
CLEARED = transition(TransitionKind.CLEARED, Level.II_ORANGE, Level.NONE)


def program(command: list[str], **extra) -> dict:
    return {"kind": "program", "name": "notify", "command": command, "when": {"rules": ["gas.*"]}, **extra}


def controller(raw: list[dict], events: list[ActuatorEvent] | None = None, **kwargs) -> ActionController:
    configs = parse_actions(raw, buses={}, rule_ids=RULES)
    return ActionController(configs, {}, SystemClock(), on_event=None if events is None else events.append, **kwargs)


@contextlib.asynccontextmanager
async def running(c: ActionController) -> AsyncIterator[ActionController]:
    task = asyncio.create_task(c.run())
    try:
        yield c
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        c.close()


async def until(predicate: Callable[[], object], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


def alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for init counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


APPEND_STDIN = "import sys; f = open(sys.argv[1], 'a'); f.write(sys.stdin.read() + '\\n'); f.close()"


async def test_the_program_gets_the_transition_as_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "stdin.jsonl"
    c = controller([program([sys.executable, "-c", APPEND_STDIN, str(out)])])
    async with running(c):
        c.update({"gas.lel1": Level.II_ORANGE}, [RAISED])
        await until(out.exists, 5.0, "the program to write its stdin")
        await until(lambda: c.status()["notify"]["attempts"] == 1 and not c.status()["notify"]["pending"], 5.0, "the run to end")
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0]) == {
        "kind": "raised", "rule": "gas.lel1", "old_level": 0, "new_level": 3, "ts_ms": T0,
        "values": {"3": 51.5}, "message": "gas.lel1: NONE → II_ORANGE", "by": None,
    }
    assert c.faults == {}


async def test_filters_rule_kind_and_level_and_runs_in_order(tmp_path: Path) -> None:
    out = tmp_path / "runs.jsonl"
    cmd = [sys.executable, "-c", APPEND_STDIN, str(out)]
    c = controller([program(cmd, kinds=["raised", "cleared"], when={"rules": ["gas.lel1"], "level": "orange"})])
    batch = [
        RAISED,
        transition(TransitionKind.FAULT, Level.II_ORANGE, Level.II_ORANGE),  # kind not wanted
        transition(TransitionKind.RAISED, Level.NONE, Level.I_RED, rule="gas.lel2"),  # rule not watched
        transition(TransitionKind.RAISED, Level.NONE, Level.III_YELLOW),  # below orange
        CLEARED,  # old level orange: wanted
    ]
    async with running(c):
        c.update({}, batch)
        await until(lambda: out.exists() and len(out.read_text().splitlines()) == 2, 5.0, "two runs")
        await asyncio.sleep(0.2)
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["kind"], r["rule"], r["new_level"]) for r in runs] == [("raised", "gas.lel1", 3), ("cleared", "gas.lel1", 0)]


async def test_a_hanging_program_is_killed_at_its_timeout_without_blocking_anything(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # The shell starts a grandchild and waits: killing only the shell would leave `sleep` holding the pipe.
    hang = ["/bin/sh", "-c", f"sleep 60 & echo $$ $! > {pids}; wait"]
    factory = MockFactory()
    events: list[ActuatorEvent] = []
    raw = [
        program(hang, timeout_s=0.5),
        {"kind": "gpio", "name": "board.siren", "pin": 17, "when": {"rules": ["gas.*"], "level": "orange"}},
    ]
    configs = parse_actions(raw, buses={}, rule_ids=RULES)
    c = ActionController(configs, {}, SystemClock(), pin_factory=factory, on_event=events.append)
    async with running(c):
        t0 = time.monotonic()
        c.update({"gas.lel1": Level.II_ORANGE}, [RAISED])
        assert time.monotonic() - t0 < 0.01, "update() must not wait for anything"
        await until(lambda: factory.pin(17).state, 0.2, "the siren pin while the program hangs")
        await until(lambda: pids.exists() and pids.read_text().strip(), 3.0, "the program to start")
        shell, child = (int(p) for p in pids.read_text().split())
        assert alive(shell) and alive(child)
        took = await until(lambda: events, 3.0, "the timeout fault")
        assert took < 1.5
        assert events[0].kind == "actuator_fault" and events[0].action == "notify"
        assert "killed after timeout_s = 0.5 s" in events[0].message and "/bin/sh -c" in events[0].message
        await until(lambda: not alive(shell) and not alive(child), 1.0, "the process group to be gone")
        c.update({"gas.lel1": Level.NONE}, [])  # the controller still works
        await until(lambda: not factory.pin(17).state, 0.2, "the pin to go low")


async def test_a_failing_program_is_a_fault_until_a_run_succeeds(tmp_path: Path) -> None:
    events: list[ActuatorEvent] = []
    script = "import json, sys; t = json.load(sys.stdin); print('modem says', t['kind']); sys.exit(3 if t['kind'] == 'raised' else 0)"
    c = controller([program([sys.executable, "-c", script])], events)
    async with running(c):
        c.update({}, [RAISED])
        await until(lambda: events, 5.0, "the fault")
        assert events[0].kind == "actuator_fault"
        assert "exited with status 3" in events[0].message and "modem says raised" in events[0].message
        assert "notify" in c.faults
        c.update({}, [CLEARED])
        await until(lambda: len(events) == 2, 5.0, "actuator_ok")
        assert events[1].kind == "actuator_ok" and c.faults == {}


async def test_a_program_that_cannot_start_is_a_fault(tmp_path: Path) -> None:
    events: list[ActuatorEvent] = []
    missing = str(tmp_path / "no-such-program")
    c = controller([program([missing])], events)
    async with running(c):
        c.update({}, [RAISED])
        await until(lambda: events, 5.0, "the fault")
    assert "cannot start" in events[0].message and missing in events[0].message


async def test_the_queue_is_bounded_and_says_what_it_dropped(tmp_path: Path) -> None:
    events: list[ActuatorEvent] = []
    c = controller([program(["/bin/sh", "-c", "sleep 60"], timeout_s=30)], events, max_pending=2)
    # Not running: nothing is taken off the queue.
    c.update({}, [RAISED, CLEARED, RAISED])
    assert c.status()["notify"]["pending"] == 2 and c.status()["notify"]["dropped"] == 1
    assert [e.kind for e in events] == ["actuator_fault"] and "1 transition(s) not run" in events[0].message


def test_output_is_logged_bounded(tmp_path: Path, caplog) -> None:
    from gateway.actions.program import OUTPUT_LIMIT

    async def go() -> None:
        c = controller([program([sys.executable, "-c", "print('x' * 100000)"])])
        async with running(c):
            c.update({}, [RAISED])
            await until(lambda: any("exited 0" in r.getMessage() for r in caplog.records), 5.0, "the log line")

    with caplog.at_level("INFO", logger="yujing.actions"):
        asyncio.run(go())
    line = next(r.getMessage() for r in caplog.records if "exited 0" in r.getMessage())
    assert "x" * OUTPUT_LIMIT in line and "x" * (OUTPUT_LIMIT + 1) not in line
    assert f"({100001 - OUTPUT_LIMIT} more bytes not shown)" in line
    assert os.environ.get("YUJING_ACTION") is None  # the environment is the child's, not ours
