"""Shared state of the fake silicon (machine, network, esp32, ntptime in this folder) under the MicroPython
unix port: a folder on the host holding what a board keeps outside its flash, and what a test scripts.

    <sim>/rtc.bin      RTC user memory (survives a "reset" or "deep sleep": the process exits and restarts)
    <sim>/cause        the reset cause the next start reports (written by deepsleep/reset, read once)
    <sim>/adc<N>       the raw 16-bit value ADC pin N reads (text; rewritten by the test at any time)
    <sim>/adc<N>.log   if a test creates it: one line per read, the epoch ms of the read (what was sampled,
                       to check against what arrived)

The folder is reached through a VfsPosix of the host, so it stays reachable after the board's flash
folder is mounted at `/` (board.py). Its path: set_dir(), or the environment variable YUJING_SIM_DIR.
"""

import os

_host = os.VfsPosix()
DIR = os.getenv("YUJING_SIM_DIR") or "/tmp/yujing-sim"


def set_dir(path):
    global DIR
    DIR = path


def read(name, default=None):
    try:
        with _host.open(DIR + "/" + name, "rb") as f:
            return f.read()
    except OSError:
        return default


def write(name, data):
    tmp = DIR + "/" + name + ".tmp"
    with _host.open(tmp, "wb") as f:
        f.write(data)
    _host.rename(tmp, DIR + "/" + name)


def remove(name):
    try:
        _host.remove(DIR + "/" + name)
    except OSError:
        pass


def append(name, line):
    """Append a line to an existing file (a test opts in by creating it); a missing file: nothing."""
    try:
        with _host.open(DIR + "/" + name, "ab") as f:
            f.write(line)
    except OSError:
        pass


def say(msg):
    """What the fake hardware did, on the console, for the test to follow (prefix `SIM `)."""
    print("SIM " + msg)
