"""A tiny test harness for the MicroPython check scripts (no unittest on a board, little here).

run(globals()) calls every test_* function (or those named in sys.argv[1:]), prints PASS/FAIL
lines and exits with the number of failures, which run.mjs passes on as its exit code.
"""

import sys


def run(ns):
    names = sorted(k for k in ns if k.startswith("test_") and callable(ns[k]))
    if len(sys.argv) > 1:
        names = [n for n in names if n in sys.argv[1:]]
    failed = 0
    for n in names:
        try:
            ns[n]()
            print("PASS", n)
        except Exception as e:  # noqa: BLE001
            failed += 1
            print("FAIL", n, repr(e))
            if hasattr(sys, "print_exception"):
                sys.print_exception(e)
    print("%d passed, %d failed" % (len(names) - failed, failed))
    sys.exit(min(failed, 100))


def eq(a, b, what=""):
    if a != b:
        raise AssertionError("%s: %r != %r" % (what, a, b))


def true(c, what=""):
    if not c:
        raise AssertionError(what or "expected true")


def raises(exc, f, *args):
    try:
        f(*args)
    except exc as e:
        return e
    raise AssertionError("%s not raised" % exc.__name__)
