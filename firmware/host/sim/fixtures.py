"""A reference node for host runs: its config, and a simulated board with its devices attached.
Shared by the MicroPython scenarios (firmware/host/checks), the bench and the CPython tests.

Catalogue (point index: device/point):
    0 crack/opening  ADC pin 34, scale 0.01 offset -2.5 mm
    1 rain/rain      pulse pin 27, 0.2 mm per tip
    2 env/temperature, 3 env/humidity   SHT4x at 0x44
    4 gas/ch4        Modbus unit 1 register 1, scale 0.1
    5 gas/temp       Modbus unit 1 registers 2-3, float32
"""

import json

from simboard import SimBoard, SimModbusSlave, SimSht4x

ADC_RAW = 5338  # -> 50.88 mm
CH4_RAW = 123  # -> 12.3 %LEL
TEMP_F32 = (0x41C8, 0x0000)  # 25.0


def config(**over):
    c = {
        "node_id": "slope-07",
        "site": "xishan",
        "sample_period_s": 10,
        "watchdog_s": 30,
        "mqtt": {"host": "127.0.0.1", "port": 1883, "keepalive_s": 60},
        "alarm_output": {"pin": 4, "level": "yellow"},
        "status_led": {"pin": 2},
        "buffer": {"blocks": 8, "block_bytes": 512},
        "sensors": [
            {
                "kind": "adc",
                "device": "crack",
                "point": "opening",
                "unit": "mm",
                "pin": 34,
                "scale": "0.01",
                "offset": "-2.5",
            },
            {"kind": "pulse", "device": "rain", "pin": 27, "per_pulse": "0.2"},
            {"kind": "sht4x", "device": "env", "i2c": {"scl": 22, "sda": 21}},
            {
                "kind": "modbus",
                "device": "gas",
                "uart": {"id": 2},
                "points": [
                    {"name": "ch4", "unit": "%LEL", "address": 1, "scale": "0.1"},
                    {"name": "temp", "unit": "Cel", "address": 2, "type": "float32"},
                ],
            },
        ],
        "rules": [
            {
                "id": "crack.opening",
                "point": "crack/opening",
                "levels": [
                    {"level": "IV_BLUE", "set": "40", "clear": "39"},
                    {"level": "III_YELLOW", "set": "60", "clear": "59"},
                    {"level": "I_RED", "set": "80", "clear": "79"},
                ],
            }
        ],
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(c.get(k), dict):
            c[k].update(v)
        else:
            c[k] = v
    return c


def provision(board, cfg, secrets=None):
    with open(board.path("/config.json"), "w") as f:
        f.write(json.dumps(cfg))
    with open(board.path("/secrets.json"), "w") as f:
        f.write(json.dumps(secrets or {}))


def board(root="", broker=None, clock=None):
    b = SimBoard(root, clock, broker)
    b.quiet = True
    b.adc(34).value = ADC_RAW
    b.i2c_bus.devices[0x44] = SimSht4x(t_raw=0x6666, rh_raw=0x8000)
    slave = SimModbusSlave(unit=1)
    slave.regs = {1: CH4_RAW, 2: TEMP_F32[0], 3: TEMP_F32[1]}
    b.slaves[2] = slave
    return b


def wipe(b):
    """Remove what a node leaves on the flash: ring slots, state, provisioned files."""
    import os

    try:
        for name in os.listdir(b.path("/ring")):
            os.remove(b.path("/ring/" + name))
    except OSError:
        pass
    for f in ("/state.json", "/state.json.tmp", "/config.json", "/secrets.json"):
        try:
            os.remove(b.path(f))
        except OSError:
            pass


def make_node(b):
    from yujing_node import config as cfgmod
    from yujing_node.node import Node

    c, s = cfgmod.load(b.path("/config.json"), b.path("/secrets.json"))
    return Node(c, s, b)
