"""Issue 7's six ways to silence the gateway, each as a small scenario that runs against either the first
release or this one, with the same inputs:

    git worktree add /tmp/yujing-old 09f1a27
    PYTHONPATH=/tmp/yujing-old .venv/bin/python bench/issue7_before_after.py    # before
    .venv/bin/python bench/issue7_before_after.py                               # after

Item 3 mounts a 3 MiB tmpfs (root only). Prints one line per failure.
"""
import os, sys, time, sqlite3, subprocess, tempfile, json
from pathlib import Path
import cbor2

from gateway import wire
from gateway.model import PointInfo, Reading

T = 1_780_000_000_000
out = []

NEW = Path(wire.__file__).with_name("command_inbox.py").exists()


class Clock:
    def time_ms(self): return T
    def monotonic(self): return 0.0
    async def sleep(self, s): pass


# 1. hostile unsigned commands → does an exception escape the command handler (and end the gateway)?
import asyncio
from gateway.rules import AlarmEngine
hostile = (("bignum id", cbor2.dumps({0: 1, 23: 10**5000})),
           ("mixed unknown keys", cbor2.dumps({0: 1, 20: "ack", 21: "r", 22: "b", 23: "i", 24: T, "x": 1, 99: 2})),
           ("bignum version", cbor2.dumps({0: 10**5000})))
res = []
for name, p in hostile:
    try:
        if NEW:
            from gateway.command_inbox import CommandInbox
            from gateway.commands import Keyring, ReplayStore
            async def save(c): pass
            inbox = CommandInbox(Keyring(()), ReplayStore(Path(tempfile.mkdtemp()) / "c.json"), site="S", gateway="g", clock=Clock(),
                                 execute=lambda c: (True, ""), save_counters=save)
            reply = asyncio.run(inbox.handle(p))
        else:
            from gateway.alarms import AlarmDesk
            class Spool0:
                events_waiting = 0
                def append_events(self, *a): pass
            desk = AlarmDesk(AlarmEngine([], lambda n: 0), Clock(), session=1, spool=Spool0(), command_key=b"k" * 32)
            reply = desk.handle_command(p)
        res.append(f"{name}: rejected with a {len(reply)}-byte reply")
    except Exception as e:
        res.append(f"{name}: {type(e).__name__} escaped")
out.append("1 hostile command: " + "; ".join(res))

# 2. the time a 512 kB bignum decimal costs the receiving path (on the event loop, in the first release)
mantissa = int.from_bytes(os.urandom(512 * 1024), "big") | 1
payload = cbor2.dumps({0: 1, 20: "ack", 23: cbor2.CBORTag(4, [-2, mantissa])})
t = time.perf_counter()
try:
    if NEW:
        asyncio.run(inbox.handle(payload))
    else:
        desk.handle_command(payload)
except Exception as e:
    pass
out.append(f"2 a {len(payload) // 1024} kB decimal in a command: {time.perf_counter() - t:.3f} s on the event loop")

# 3. full disk at COMMIT (3 MiB tmpfs)
from gateway.spool import Spool, SpoolError
mnt = Path(tempfile.mkdtemp()) / "fs"; mnt.mkdir()
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], check=True)
try:
    s = Spool(mnt / "spool.db"); s.start_session([PointInfo("d", "p", "", "uint16")], T)
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    for size in (65536, 4096, 1):
        try:
            while os.write(fd, b"\0" * size): pass
        except OSError: pass
    os.close(fd)
    kinds = set()
    if NEW:
        from gateway import spool as spool_module
    for i in range(200):
        try:
            s.append(1, [Reading(j, T + i, i * 100 + j) for j in range(50)])
        except Exception as e:
            kinds.add(f"{type(e).__module__}.{type(e).__name__}: {str(e)[:60]}")
            if len(kinds) >= 2: break
    out.append("3 full disk: " + " | ".join(sorted(kinds)))
finally:
    subprocess.run(["umount", "-l", str(mnt)])

# 4. corrupt / zero-length spool at start: what the gateway's start does with it
def start(d):
    if NEW:
        from gateway.storage import Storage
        st = Storage(d / "spool.db")
        got = st.open([], T)
        return f"runs as session {got.session}; {len(got.notes)} fault event(s)"
    s = Spool(d / "spool.db")  # the first release's Gateway.run opened the spool like this, then start_session
    return f"runs as session {s.start_session([], T)}"
for what, corrupt in (("garbage", lambda p: p.write_bytes(os.urandom(8192))), ("zero-length", lambda p: p.write_bytes(b""))):
    d = Path(tempfile.mkdtemp())
    if NEW:
        from gateway.storage import Storage
        for _ in range(3):
            st = Storage(d / "spool.db"); st.open([], T); st.spool.close()
    else:
        s = Spool(d / "spool.db"); [s.start_session([], T) for _ in range(3)]; s.close()
    spool = d / "spool.db"
    for f in (sorted(spool.iterdir()) if spool.is_dir() else [spool]):  # since issue 12 the spool is a directory
        if f.name != "lock":
            corrupt(f)
    try:
        r = start(d)
    except Exception as e:
        r = f"{type(e).__name__} at start: {str(e)[:60]}"
    out.append(f"4 {what} spool after 3 sessions: {r}")

# 5. value before status in one poll (engine in file order)
import tomllib
from gateway.rules import AlarmEngine, parse_rules
rules = parse_rules(tomllib.loads('''
[[rules]]
kind = "threshold"
id = "chem.lel1"
point = "lel1.conc"
levels = [ { level = "III_YELLOW", set = 25, clear = 23 } ]
[rules.fault]
flags = ["lel1.fault"]
''')["rules"])
idx = {"lel1.conc": 0, "lel1.fault": 1}
e = AlarmEngine(rules, idx.__getitem__)
poll1, poll2 = [Reading(0, T, 37), Reading(1, T, False)], [Reading(0, T + 1000, 0), Reading(1, T + 1000, True)]
if NEW:  # the gateway hands the engine a whole poll
    e.evaluate_poll(poll1); kinds = [str(t.kind) for t in e.evaluate_poll(poll2)]
else:  # the first release evaluated the poll's readings one by one, in site-file order
    [e.evaluate(r) for r in poll1]; kinds = [str(t.kind) for r in poll2 for t in e.evaluate(r)]
out.append(f"5 0 %LEL and the fault bit in one poll (value point first in the file): {kinds}")

# 6. restart during rain
from gateway.rules import MemoryStateStore
rain = parse_rules(tomllib.loads('''
[[rules]]
kind = "accumulation"
id = "res.rain"
point = "rain.total"
levels = [ { level = "IV_BLUE", window_s = 600, set = 10.0, clear = 8.0 } ]
''')["rules"])
store = MemoryStateStore()
e = AlarmEngine(rain, {"rain.total": 0}.__getitem__, store=store)
c = 0.0
for m in range(12):
    e.evaluate(Reading(0, T + m * 60000, c)); c += 1.0
if hasattr(e, "save"): e.save()
e2 = AlarmEngine(rain, {"rain.total": 0}.__getitem__, store=store)
after = [str(t.kind) for t in e2.evaluate(Reading(0, T + 12 * 60000 + 5000, c))]
out.append(f"6 restart while raining: level before {e.level('res.rain').name}, first reading after restart → {after or 'no change'}")

print("\n".join(out))
