"""A simulated GSM modem on a pseudo-terminal, for tests and the SMS latency bench: it answers the AT
dialogue a real modem answers, checks it (PDU mode set, the AT+CMGS length matching the PDU it then gets),
and keeps every PDU it was given (decoded by the `decode` function the test passes, when it passes one).

Modes imitate what goes wrong at a site: "ok", "no_sim", "no_network", "no_credit" (+CMS ERROR 21),
"silent" (no answer at all).
"""

from __future__ import annotations

import asyncio
import os
import termios
import time
import tty
from collections.abc import Callable
from typing import Any


class SimModem:
    def __init__(self, decode: Callable[[str], Any] | None = None) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.master, termios.TCSANOW)
        tty.setraw(self.slave, termios.TCSANOW)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.decode = decode
        self.mode = "ok"
        self.commands: list[str] = []
        self.pdus: list[str] = []
        self.messages: list[Any] = []  # decoded PDUs
        self.accepted_at: list[float] = []  # monotonic time of each +CMGS
        self.errors: list[str] = []  # dialogue mistakes the gateway made
        self._pdu_mode = False
        self._expect_length: int | None = None
        self._buf = b""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def _say(self, *lines: str) -> None:
        os.write(self.master, b"".join(b"\r\n" + line.encode() + b"\r\n" for line in lines))

    async def _run(self) -> None:
        while True:
            try:
                self._buf += os.read(self.master, 4096)
            except (BlockingIOError, OSError):
                await asyncio.sleep(0.005)
                continue
            while True:
                if self._expect_length is not None:
                    if b"\x1a" not in self._buf:
                        break
                    pdu, _, self._buf = self._buf.partition(b"\x1a")
                    self._pdu(pdu.decode("ascii", "replace").strip())
                    continue
                if b"\r" not in self._buf:
                    break
                line, _, self._buf = self._buf.partition(b"\r")
                self._command(line.decode("ascii", "replace").strip())

    def _command(self, cmd: str) -> None:
        if not cmd:
            return
        self.commands.append(cmd)
        if self.mode == "silent":
            return
        if cmd in ("AT", "ATE0", "AT+CMEE=1"):
            self._say("OK")
        elif cmd == "AT+CPIN?":
            self._say("+CME ERROR: 10") if self.mode == "no_sim" else self._say("+CPIN: READY", "OK")
        elif cmd == "AT+CREG?":
            self._say("+CREG: 0,2", "OK") if self.mode == "no_network" else self._say("+CREG: 0,1", "OK")
        elif cmd == "AT+CMGF=0":
            self._pdu_mode = True
            self._say("OK")
        elif cmd.startswith("AT+CMGS="):
            if not self._pdu_mode:
                self.errors.append("AT+CMGS before AT+CMGF=0")
                self._say("+CMS ERROR: 302")
                return
            self._expect_length = int(cmd.split("=", 1)[1])
            os.write(self.master, b"\r\n> ")
        else:
            self._say("ERROR")

    def _pdu(self, pdu: str) -> None:
        length, self._expect_length = self._expect_length, None
        if len(pdu) // 2 - 1 - int(pdu[:2], 16) != length:  # the TPDU: all of it but the SMSC part
            self.errors.append(f"AT+CMGS={length} for a TPDU of {len(pdu) // 2 - 1 - int(pdu[:2], 16)} octets")
            self._say("+CMS ERROR: 304")
            return
        if self.mode == "no_credit":
            self._say("+CMS ERROR: 21")
            return
        self.pdus.append(pdu)
        if self.decode is not None:
            self.messages.append(self.decode(pdu))
        self.accepted_at.append(time.monotonic())
        self._say(f"+CMGS: {len(self.pdus) % 256}", "OK")
