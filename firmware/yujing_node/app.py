"""Boot entry: load the provisioned files, then run the node; never a crash loop.

A missing or malformed /config.json or /secrets.json puts the node in a safe, visible state:
one console line naming the file and field, the status LED blinking three short flashes every
two seconds, outputs untouched, and a retry of the files every `retry_ms` (provisioning over
mpremote can fix them meanwhile). An unexpected error while running is logged and, after a
pause long enough to read the log and not to hammer the battery, the board restarts; the ring
buffer and the RTC state keep what was collected.
"""

from . import config
from .config import ConfigError

_BLINKS_CONFIG = 3
_BLINKS_CRASH = 5


def blink(board, led, count, period_ms=2000):
    """One period of `count` short flashes; the remainder of the period the LED is off."""
    used = 0
    for _ in range(count):
        if led is not None:
            led.on()
        board.clock.sleep_ms(100)
        if led is not None:
            led.off()
        board.clock.sleep_ms(150)
        used += 250
    if period_ms > used:
        board.clock.sleep_ms(period_ms - used)


def load(board, retry_ms=30000, max_tries=None):
    """(Config, Secrets), retrying in the safe state while the files are missing or wrong.
    Returns None after max_tries failures (for tests; a board retries forever)."""
    led = None
    tries = 0
    while True:
        try:
            return config.load(board.path(config.CONFIG_FILE), board.path(config.SECRETS_FILE), board.path)
        except ConfigError as e:
            tries += 1
            board.log("yujing: config error: %s (retry %d in %d s)" % (e, tries, retry_ms // 1000))
        if led is None and board.status_led is not None:
            led = board.pin_out(board.status_led, False)
        if max_tries is not None and tries >= max_tries:
            return None
        waited = 0
        while waited < retry_ms:
            blink(board, led, _BLINKS_CONFIG)
            waited += 2000


def main(board=None, max_cycles=None, retry_ms=30000, max_tries=None):
    if board is None:
        from .hw import Board

        board = Board()
    loaded = load(board, retry_ms, max_tries)
    if loaded is None:
        return None
    from .node import Node

    node = Node(loaded[0], loaded[1], board)
    try:
        node.run(max_cycles)
    except Exception as e:  # noqa: BLE001 (last resort: log, show, restart; never a tight loop)
        board.log("yujing: unexpected error: %r; restarting in 30 s" % (e,))
        led = board.pin_out(board.status_led, False) if board.status_led is not None else None
        for _ in range(15):
            node.feed()
            blink(board, led, _BLINKS_CRASH)
        board.reset()
    return node
