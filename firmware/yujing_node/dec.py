"""Exact decimals as integer pairs: the value is m * 10**e.

Scaled sensor values are computed here, on integers only, so they are exact on a board whose
floats are single precision (ESP32). Configuration writes scale, offset and thresholds as decimal
strings ("0.01", "-2.5"); a JSON float would already have been rounded to binary.
"""


def parse(s):
    """ "-12.50" -> (-1250, -2); an int -> (int, 0). Raises ValueError for anything else."""
    if isinstance(s, bool):
        raise ValueError("expected a decimal")
    if isinstance(s, int):
        return s, 0
    if not isinstance(s, str):
        raise ValueError('expected a decimal string such as "0.01"')
    t = s.strip().lower()
    exp = 0
    i = t.find("e")
    if i >= 0:
        exp = int(t[i + 1 :])  # ValueError when not a number
        t = t[:i]
    neg = t[:1] == "-"
    if t[:1] in ("-", "+"):
        t = t[1:]
    i = t.find(".")
    frac = t[i + 1 :] if i >= 0 else ""
    digits = (t[:i] if i >= 0 else t) + frac
    if not digits or not digits.isdigit():
        raise ValueError("not a decimal: %r" % s)
    m = int(digits)
    return (-m if neg else m), exp - len(frac)


def align(am, ae, bm, be):
    """Both mantissas at the smaller exponent: (am', bm', e)."""
    if ae > be:
        return am * 10 ** (ae - be), bm, be
    return am, bm * 10 ** (be - ae), ae


def cmp(am, ae, bm, be):
    """-1, 0 or 1 as a*10**ae compares with b*10**be, exactly."""
    a, b, _ = align(am, ae, bm, be)
    return (a > b) - (a < b)


def to_str(m, e):
    """For log lines and error messages: (1250, -2) -> "12.50"."""
    if e >= 0:
        return str(m * 10**e)
    s = str(abs(m))
    k = -e
    if len(s) <= k:
        s = "0" * (k - len(s) + 1) + s
    return ("-" if m < 0 else "") + s[:-k] + "." + s[-k:]


class Linear:
    """value = raw * scale + offset, exactly: precomputed once so each sample is one multiply-add."""

    def __init__(self, scale, offset):
        sm, se = scale
        om, oe = offset
        self.scale, self.offset, self.exp = align(sm, se, om, oe)

    def mantissa(self, raw):
        """The mantissa of raw*scale+offset at exponent self.exp."""
        return raw * self.scale + self.offset
