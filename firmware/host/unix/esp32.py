"""Fake `esp32` for the unix port: the deep-sleep wake and hold settings are only recorded."""

WAKEUP_ALL_LOW = 0
WAKEUP_ANY_HIGH = 1
wake_pin = None
hold = False


def wake_on_ext0(pin, level=WAKEUP_ALL_LOW):
    global wake_pin
    wake_pin = pin


def gpio_deep_sleep_hold(on):
    global hold
    hold = bool(on)
