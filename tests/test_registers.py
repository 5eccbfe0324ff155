"""Register codec: every data type, all four 32-bit layouts, scaling, bits and golden frames."""

from __future__ import annotations

from decimal import Decimal

import pytest

from device_drivers.registers import PointSpec, Table, decode_raw, encode_words, evaluate
from gateway.model import Quality


def point(type_: str = "uint16", **kw: object) -> PointSpec:
    return PointSpec(name="p", table=kw.pop("table", Table.HOLDING), address=0, type=type_, **kw)  # type: ignore[arg-type]


# (type, raw value, registers as ABCD = byte big, word big)
CASES = [
    ("int16", -2, [0xFFFE]),
    ("uint16", 65535, [0xFFFF]),
    ("int32", -123456, [0xFFFE, 0x1DC0]),
    ("uint32", 0x12345678, [0x1234, 0x5678]),
    ("float32", 1.5, [0x3FC0, 0x0000]),
    ("int64", -2, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]),
    ("uint64", 0x0102030405060708, [0x0102, 0x0304, 0x0506, 0x0708]),
    ("float64", -2.25, [0xC002, 0x0000, 0x0000, 0x0000]),
]


def layout(words: list[int], byte_order: str, word_order: str) -> list[int]:
    if byte_order == "little":
        words = [((w & 0xFF) << 8) | (w >> 8) for w in words]
    return list(reversed(words)) if word_order == "little" else words


@pytest.mark.parametrize(("type_", "raw", "abcd"), CASES)
@pytest.mark.parametrize(("byte_order", "word_order"), [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")])
def test_every_type_in_every_order(type_: str, raw: float, abcd: list[int], byte_order: str, word_order: str) -> None:
    p = point(type_, byte_order=byte_order, word_order=word_order)
    words = layout(abcd, byte_order, word_order)
    assert decode_raw(p, words) == raw
    assert encode_words(p, raw) == words


def test_four_32bit_layouts_of_one_float_by_name() -> None:
    # 123.456 as float32 is 0x42F6E979: bytes A=42 B=F6 C=E9 D=79
    layouts = {"ABCD": [0x42F6, 0xE979], "CDAB": [0xE979, 0x42F6], "BADC": [0xF642, 0x79E9], "DCBA": [0x79E9, 0xF642]}
    orders = {"ABCD": ("big", "big"), "CDAB": ("big", "little"), "BADC": ("little", "big"), "DCBA": ("little", "little")}
    for name, words in layouts.items():
        b, w = orders[name]
        assert decode_raw(point("float32", byte_order=b, word_order=w), words) == pytest.approx(123.456, rel=1e-6), name


def test_scaling_is_exact_decimal_for_integers() -> None:
    # reservoir radar: ZU = 1963.000 − gap/1000, gap 9617 mm (frame 01 03 02 25 91 …)
    level = point("uint16", scale=Decimal("-0.001"), offset=Decimal("1963.0"))
    assert evaluate(level, words=[0x2591]) == (Decimal("1953.383"), Quality.GOOD)
    # CWT soil temperature 0xFF9B = −10.1 °C (int16 ÷10)
    assert evaluate(point("int16", scale=Decimal("0.1")), words=[0xFF9B]) == (Decimal("-10.1"), Quality.GOOD)
    # rain gauge u32 ×0.1 mm: 00 00 04 D2 = 123.4 mm
    assert evaluate(point("uint32", scale=Decimal("0.1")), words=[0x0000, 0x04D2]) == (Decimal("123.4"), Quality.GOOD)


def test_midas_concentration_low_word_first() -> None:
    p = point("float32", word_order="little")
    assert decode_raw(p, encode_words(p, 12.5)) == 12.5
    assert encode_words(p, 12.5) == [0x0000, 0x4148]


def test_bit_of_a_register_and_bools() -> None:
    status = 0x8020  # generic gas module: bit15 valid, bit5 sensor lost
    assert evaluate(point("bit", bit=5), words=[status]) == (True, Quality.GOOD)
    assert evaluate(point("bit", bit=0), words=[status]) == (False, Quality.GOOD)
    assert evaluate(point("bool", table=Table.COIL), bits=[True]) == (True, Quality.GOOD)


def test_out_of_range_keeps_value_with_bad_quality() -> None:
    p = point("uint16", min=0, max=100)
    assert evaluate(p, words=[250]) == (250, Quality.OUT_OF_RANGE)
    assert evaluate(p, words=[99]) == (99, Quality.GOOD)


def test_nan_and_short_replies_are_decode_errors_not_crashes() -> None:
    assert evaluate(point("float32"), words=[0x7FC0, 0x0000]) == (None, Quality.DECODE)
    assert evaluate(point("uint32"), words=[0x0001]) == (None, Quality.DECODE)


@pytest.mark.parametrize(("type_", "raw", "abcd"), CASES)
@pytest.mark.parametrize(("byte_order", "word_order"), [("big", "big"), ("big", "little"), ("little", "big"), ("little", "little")])
@pytest.mark.parametrize(("scale", "offset", "lo", "hi"), [(Decimal(1), Decimal(0), None, None), (Decimal("-0.001"), Decimal("1963"), -10, 1e30)])
def test_compiled_decoder_equals_reference(type_, raw, abcd, byte_order, word_order, scale, offset, lo, hi) -> None:
    from device_drivers.registers import compile_point

    p = point(type_, byte_order=byte_order, word_order=word_order, scale=scale, offset=offset, min=lo, max=hi)
    words = layout(abcd, byte_order, word_order)
    assert compile_point(p)(words) == evaluate(p, words=words)
    assert compile_point(p)(words[:-1] or [1, 2, 3, 4, 5]) == (None, Quality.DECODE)


def test_compiled_decoder_bits_nan_and_range() -> None:
    from device_drivers.registers import compile_point

    assert compile_point(point("bit", bit=15))([0x8000]) == (True, Quality.GOOD)
    assert compile_point(point("bool", table=Table.DISCRETE))([False]) == (False, Quality.GOOD)
    assert compile_point(point("float32"))([0x7FC0, 0]) == (None, Quality.DECODE)
    assert compile_point(point("float32"))([0x7F80, 0]) == (None, Quality.DECODE)  # +inf
    assert compile_point(point("int16", min=-5, max=5))([0xFFF0]) == (-16, Quality.OUT_OF_RANGE)
