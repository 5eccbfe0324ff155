"""Fake `ntptime` for the unix port: the host's clock is already set (the unix port reads it directly)."""

host = "pool.ntp.org"


def settime():
    pass
