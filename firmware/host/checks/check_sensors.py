# Sensor drivers under real MicroPython against the simulated board's devices: ADC calibration,
# pulse counting, SHT4x conversion and CRC, Modbus RTU framing, CRC-16 and error qualities.
from check import eq, raises, run
from simboard import SimBoard, SimModbusSlave, SimSht4x
from yujing_node.config import ConfigError, Fields
from yujing_node.records import FLOAT, NULL, Batch
from yujing_node.sensors import parse
from yujing_node.sensors.modbus import crc16
from yujing_node.sensors.sht4x import centi_celsius, centi_rh, crc8

TS = 1767225600000


def sensor(board, d, base=0):
    s = parse(Fields("/config.json", "sensors[0]", d))
    s.open(board, base)
    return s


def readings(s):
    b = Batch(8)
    s.read(b, TS)
    out = []
    for i in range(b.n):
        k = b.kind(i)
        v = None if k == NULL else (b.fval(i) if k == FLOAT else (b.ival(i), b.exp(i)))
        out.append((b.point(i), v, b.quality(i)))
    return out


def test_adc_linear_calibration_is_exact_and_averages():
    board = SimBoard()
    s = sensor(
        board,
        {"kind": "adc", "device": "crack", "pin": 34, "scale": "0.0015", "offset": "-2.5", "samples": 4, "max": "90"},
        base=3,
    )
    board.adcs[34].value = 40000
    eq(readings(s), [(3, (600000 - 25000, -4), 0)])  # 40000 * 0.0015 - 2.5 = 57.5000
    eq(board.adcs[34].reads, 4)
    board.adcs[34].value = 65535
    eq(readings(s), [(3, (983025 - 25000, -4), 4)], "95.8025 > max 90: out_of_range, value kept")


def test_pulse_counter_debounces_and_reports_rain_per_sample():
    board = SimBoard()
    s = sensor(board, {"kind": "pulse", "device": "rain", "pin": 27, "per_pulse": "0.2", "debounce_ms": 50})
    board.pulse(27, 3, gap_ms=100)
    board.pulse(27, 2, gap_ms=10)  # contact bounce: within 50 ms of the last counted edge
    eq(readings(s), [(0, (6, -1), 0)])  # 3 tips x 0.2 mm
    eq(readings(s), [(0, (0, -1), 0)], "counter restarts each sample")
    s.resume(7)
    s.tip()
    eq(s.state(), 8)


def test_sht4x_conversion_on_integers():
    eq(centi_celsius(0), -4500)
    eq(centi_celsius(65535), 13000)
    eq(centi_celsius(0x6666), 2500)
    eq(centi_rh(0), 0)  # clamped: -6 %RH is impossible
    eq(centi_rh(65535), 10000)
    eq(centi_rh(0x8000), 5650)
    eq(crc8(b"\xbe\xef", 0, 2), 0x92)  # the datasheet's example


def test_sht4x_reads_and_flags_crc_and_absence():
    board = SimBoard()
    dev = SimSht4x(t_raw=0x6E00, rh_raw=0x4000)
    board.i2c_bus.devices[0x44] = dev
    s = sensor(board, {"kind": "sht4x", "device": "env", "i2c": {"scl": 22, "sda": 21}}, base=1)
    eq(readings(s), [(1, (centi_celsius(0x6E00), -2), 0), (2, (centi_rh(0x4000), -2), 0)])
    eq(dev.last_cmd, b"\xfd")
    dev.corrupt_t = True
    eq(readings(s), [(1, None, 2), (2, (centi_rh(0x4000), -2), 0)])
    dev.absent = True
    eq(readings(s), [(1, None, 1), (2, None, 1)])


def test_modbus_crc16_matches_a_known_frame():
    frame = bytes((0x01, 0x03, 0x00, 0x01, 0x00, 0x01))
    c = crc16(frame, 6)
    eq((c & 0xFF, c >> 8), (0xD5, 0xCA))


def modbus(board, points, **extra):
    slave = SimModbusSlave(unit=3)
    board.slaves[2] = slave
    d = {"kind": "modbus", "device": "gas", "unit_id": 3, "uart": {"id": 2, "de": 5}, "points": points}
    d.update(extra)
    return sensor(board, d, base=10), slave


def test_modbus_reads_one_request_per_function_and_decodes_types():
    board = SimBoard()
    s, slave = modbus(
        board,
        [
            {"name": "ch4", "address": 1, "scale": "0.1"},
            {"name": "tilt", "address": 2, "type": "int32", "scale": "0.001"},
            {"name": "delta", "address": 4, "type": "int16"},
            {"name": "temp", "address": 10, "function": 4, "type": "float32"},
            {
                "name": "level",
                "address": 12,
                "function": 4,
                "type": "uint32",
                "word_order": "little",
                "scale": "0.001",
                "offset": "1900",
            },
        ],
    )
    slave.regs = {1: 123, 2: 0xFFFF, 3: 0xFE38, 4: 0xFFFE, 10: 0x41C8, 11: 0x0000, 12: 0x2591, 13: 0x0000}
    eq(
        readings(s),
        [
            (10, (12300 // 100, -1), 0),
            (11, (-456, -3), 0),
            (12, (-2, 0), 0),
            (13, 25.0, 0),
            (14, (9617 + 1900000, -3), 0),
        ],
    )
    eq([r[:6] for r in slave.requests], [b"\x03\x03\x00\x01\x00\x04", b"\x03\x04\x00\x0a\x00\x04"])
    eq(board.pins[5].history, [0, 1, 0, 1, 0], "RS-485 driver enabled only while sending")


def test_modbus_faults_become_quality_codes():
    board = SimBoard()
    s, slave = modbus(board, [{"name": "ch4", "address": 1}, {"name": "co", "address": 2}], timeout_ms=100)
    slave.regs = {1: 5, 2: 6}
    for fault, q in (("silent", 1), ("bad_crc", 2), ("short", 2), ("wrong_unit", 2), (4, 0x84)):
        slave.fault = fault
        eq(readings(s), [(10, None, q), (11, None, q)], str(fault))
    slave.fault = None
    slave.regs = {1: 5}  # register 2 missing: the slave answers exception 2 (illegal address)
    eq(readings(s), [(10, None, 0x82), (11, None, 0x82)])


def test_modbus_nan_is_a_decode_error():
    board = SimBoard()
    s, slave = modbus(board, [{"name": "t", "address": 1, "type": "float32"}])
    slave.regs = {1: 0x7FC0, 2: 0}
    eq(readings(s), [(10, None, 3)])


def test_modbus_config_errors():
    board = SimBoard()
    e = raises(ConfigError, modbus, board, [{"name": "t", "address": 1, "type": "float32", "scale": "0.1"}])
    eq(str(e), "/config.json: sensors[0].points[0].scale: float32 registers are sent as read: no scale or offset")


run(globals())
