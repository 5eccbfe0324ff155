# CBOR writer, decimals and records under real MicroPython. Expected bytes are cbor2 6.2's
# canonical output (the gateway's encoder); tests/test_firmware_cbor.py compares whole
# messages with gateway/wire.py.
import binascii
import struct

from check import eq, raises, run, true
from yujing_node import dec
from yujing_node.cbor import Writer
from yujing_node.records import DEC, FLOAT, INT, NULL, TRUE, Batch

w = Writer(64)


def hx(fn, *args):
    w.reset()
    fn(*args)
    return binascii.hexlify(bytes(w.view())).decode()


def test_integers_use_the_shortest_head():
    cases = [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (255, "18ff"),
        (256, "190100"),
        (65535, "19ffff"),
        (65536, "1a00010000"),
        (4294967295, "1affffffff"),
        (4294967296, "1b0000000100000000"),
        (18446744073709551615, "1bffffffffffffffff"),
        (-1, "20"),
        (-24, "37"),
        (-25, "3818"),
        (-256, "38ff"),
        (-257, "390100"),
        (-9223372036854775808, "3b7fffffffffffffff"),
    ]
    for v, want in cases:
        eq(hx(w.int, v), want, str(v))


def test_integers_beyond_64_bits_are_refused():
    raises(ValueError, w.int, 1 << 64)
    raises(ValueError, w.int, -(1 << 64) - 1)


def test_floats_take_the_shortest_exact_width():
    cases = [
        (0.0, "f90000"),
        (-0.0, "f98000"),
        (1.5, "f93e00"),
        (65504.0, "f97bff"),
        (5.960464477539063e-08, "f90001"),  # smallest float16 subnormal
        (6.103515625e-05, "f90400"),  # smallest float16 normal
        (2.9802322387695312e-08, "fa33000000"),  # 2**-25: float32, not float16
        (65520.0, "fa477ff000"),  # just above float16's range
        (1.401298464324817e-45, "fa00000001"),  # smallest float32 subnormal
        (3.4028234663852886e38, "fa7f7fffff"),
        (1.1, "fb3ff199999999999a"),
        (1e300, "fb7e37e43c8800759c"),
        (5e-324, "fb0000000000000001"),
        (float("inf"), "f97c00"),
        (float("-inf"), "f9fc00"),
        (float("nan"), "f97e00"),
    ]
    for v, want in cases:
        eq(hx(w.float, v), want, repr(v))


def test_float16_is_packed_by_hand_not_with_struct_e():
    # the same bits as struct 'e' where this port has it (an ESP32 build may not)
    for bits in (0x0001, 0x03FF, 0x0400, 0x3C00, 0x7BFF, 0x8001, 0xC000):
        v = struct.unpack("<e", struct.pack("<H", bits))[0]
        eq(hx(w.float, v), "f9%04x" % bits, hex(bits))


def test_decimals_follow_the_wire_rule():
    cases = [
        ((195338, -2), "c482211a0002fb0a"),  # 1953.38: no float holds it -> tag 4
        ((325, -1), "f95010"),  # 32.5 is binary-exact -> float16
        ((-1, -1), "c4822020"),  # -0.1
        ((10000, -2), "1864"),  # 100.00 is whole -> int 100
        ((123, -6), "c48225187b"),  # 0.000123
        ((0, -3), "00"),
        ((-25, 0), "3818"),
        ((12, 2), "1904b0"),  # 1200
    ]
    for (m, e), want in cases:
        eq(hx(w.decimal, m, e), want, dec.to_str(m, e))


def test_decimal_parse_and_linear_scaling_are_exact():
    eq(dec.parse("0.01"), (1, -2))
    eq(dec.parse("-2.50"), (-250, -2))
    eq(dec.parse("1e-3"), (1, -3))
    eq(dec.parse(7), (7, 0))
    for bad in ("", "1.2.3", "abc", "--1", 1.5, True):
        raises(ValueError, dec.parse, bad)
    lin = dec.Linear(dec.parse("0.01"), dec.parse("1900"))
    m = lin.mantissa(5338)
    eq((m, lin.exp), (195338, -2))
    eq(hx(w.decimal, m, lin.exp), "c482211a0002fb0a")
    eq(dec.cmp(1953380, -3, 195338, -2), 0)
    eq(dec.cmp(-1, 0, 1, -5), -1)
    eq(dec.to_str(-5, -3), "-0.005")


def test_text_and_buffer_overflow():
    eq(hx(w.text, "雨"), "63e99ba8")
    small = Writer(4)
    small.int(1)
    raises(ValueError, small.int, 1 << 40)


def test_batch_round_trips_every_kind_and_sorts_stably():
    b = Batch(8)
    b.add(3, 2000, INT, 0, -7)
    b.add(1, 1000, FLOAT, 0, 0.1)
    b.add(2, 1000, DEC, -2, 195338, 4)
    b.add_none(0, 2000, 0x82)
    b.add(5, 1000, TRUE)
    eq((b.ts(0), b.point(0), b.kind(0), b.ival(0)), (2000, 3, INT, -7))
    eq(b.fval(1), 0.1)
    eq((b.exp(2), b.ival(2), b.quality(2)), (-2, 195338, 4))
    eq((b.kind(3), b.quality(3)), (NULL, 0x82))
    b.sort()
    eq(list(b.order[: b.n]), [1, 2, 4, 3, 0])
    raises(ValueError, b.add, 1, 1, INT, 0, 1 << 63)
    for _ in range(3):
        b.add(1, 1, INT)
    true(b.full())
    raises(ValueError, b.add, 1, 1, INT)


run(globals())
