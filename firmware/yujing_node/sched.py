"""Scheduling arithmetic, on epoch milliseconds so it also holds across deep sleep."""


def next_due(now_ms, period_ms):
    """The next multiple of the period after now: nodes with one period sample in step."""
    return (now_ms // period_ms + 1) * period_ms


def backoff_ms(fails, salt=0, base_ms=2000, cap_ms=300000):
    """Delay before the next connect after `fails` failures in a row: base * 2**(fails-1) capped,
    plus up to a quarter of that spread by `salt` (e.g. from the node id) so that nodes that lost
    the same broker do not all come back in the same second."""
    if fails <= 0:
        return 0
    d = base_ms << min(fails - 1, 16)
    if d > cap_ms:
        d = cap_ms
    return d + (salt * 997) % (d // 4 + 1)
