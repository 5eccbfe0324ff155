# Provisioned files under real MicroPython: a good config parses; every kind of mistake raises
# ConfigError naming the file and the key; a missing or broken file puts the node in the safe
# state (log line, LED pattern, retry) instead of a crash.
import json
import os

from check import eq, raises, run, true
from simboard import SimBoard
from yujing_node import app, config
from yujing_node.config import Config, ConfigError, Secrets


def good():
    return {
        "node_id": "slope-07",
        "site": "xishan",
        "sample_period_s": 60,
        "mode": "sleep",
        "mqtt": {"host": "10.0.0.2"},
        "network": {"type": "wifi", "ssid": "site-ap"},
        "status_led": {"pin": 2},
        "alarm_output": {"pin": 4, "level": "orange", "active_low": True},
        "buffer": {"blocks": 32, "sync": "cycle"},
        "sensors": [
            {
                "kind": "adc",
                "device": "crack",
                "point": "opening",
                "unit": "mm",
                "pin": 34,
                "scale": "0.0015",
                "offset": "-2.5",
            },
            {"kind": "pulse", "device": "rain", "pin": 27, "per_pulse": "0.2"},
            {"kind": "sht4x", "device": "env", "i2c": {"scl": 22, "sda": 21}},
            {
                "kind": "modbus",
                "device": "gas",
                "uart": {"id": 2, "de": 5},
                "unit_id": 3,
                "points": [
                    {"name": "ch4", "unit": "%LEL", "address": 1, "scale": "0.1", "max": "100"},
                    {"name": "temp", "address": 4, "function": 4, "type": "float32"},
                ],
            },
        ],
        "rules": [
            {
                "id": "crack.opening",
                "point": "crack/opening",
                "direction": "high",
                "levels": [{"level": "IV_BLUE", "set": "10", "clear": "9.5"}, {"level": "red", "set": "40"}],
                "on_delay_count": 2,
            }
        ],
    }


def error(d, file="/config.json"):
    return str(raises(ConfigError, Config, d, file))


def test_good_config_builds_the_catalogue_in_sensor_order():
    c = Config(good())
    eq(
        (c.node_id, c.site, c.period_ms, c.sleep, c.port, c.prefix),
        ("slope-07", "xishan", 60000, True, 1883, "yujing/v1"),
    )
    eq(
        c.catalogue,
        [
            ("crack", "opening", "mm", "uint16"),
            ("rain", "rain", "mm", "uint32"),
            ("env", "temperature", "Cel", "uint16"),
            ("env", "humidity", "%RH", "uint16"),
            ("gas", "ch4", "%LEL", "uint16"),
            ("gas", "temp", "", "float32"),
        ],
    )
    eq((c.alarm_pin, c.alarm_level, c.led), ((4, True), 3, (2, False)))  # "orange" = II_ORANGE
    eq((c.ring_blocks, c.ring_block_bytes, c.ring_sync_cycle), (32, 512, True))
    eq(c.rules[0].point, 0)
    eq(c.sensors[3].reqs, [(3, 1, 1, [0]), (4, 4, 2, [1])])


def test_missing_required_field_names_it():
    d = good()
    del d["node_id"]
    eq(error(d), "/config.json: node_id: missing")
    d = good()
    del d["mqtt"]["host"]
    eq(error(d), "/config.json: mqtt.host: missing")


def test_wrong_types_and_ranges_name_the_key_path():
    d = good()
    d["sensors"][0]["pin"] = "34"
    eq(error(d), "/config.json: sensors[0].pin: expected an integer")
    d = good()
    d["sample_period_s"] = 0
    eq(error(d), "/config.json: sample_period_s: 0 is outside 1..86400")
    d = good()
    d["sensors"][3]["points"][1]["type"] = "float16"
    true("sensors[3].points[1].type: 'float16' is not one of" in error(d))


def test_scale_as_json_float_is_refused_to_keep_it_exact():
    d = good()
    d["sensors"][0]["scale"] = 0.0015
    eq(error(d), '/config.json: sensors[0].scale: write it as a string ("0.0015"), so it stays an exact decimal')
    d["sensors"][0]["scale"] = "0,0015"
    eq(error(d), '/config.json: sensors[0].scale: expected a decimal string such as "0.01"')


def test_unknown_keys_are_errors_not_ignored():
    d = good()
    d["mqtt"]["hots"] = "x"
    true(error(d).startswith("/config.json: mqtt.hots: unknown key"))
    d = good()
    d["sensors"][1]["kind"] = "geiger"
    true(error(d).startswith("/config.json: sensors[1].kind: 'geiger' is not one of adc, pulse, sht4x, modbus"))


def test_rule_follows_the_gateway_threshold_options():
    r = Config(good()).rules[0]
    eq((r.point, r.id, r.high, r.on_delay, r.off_delay, r.raise_only), (0, "crack.opening", True, 2, 1, False))
    eq([(lv, s[:2], c[:2]) for lv, s, c in r.levels], [(1, (10, 0), (95, -1)), (4, (40, 0), (40, 0))])


def test_rule_errors():
    d = good()
    d["rules"][0]["point"] = "crack/width"
    true(error(d).startswith("/config.json: rules[0].point: no point 'crack/width' (known: "))
    d = good()
    d["rules"][0]["levels"][1]["set"] = "5"
    eq(error(d), "/config.json: rules[0].levels[1].set: 5 must be above 10 of a lower level")
    d = good()
    d["rules"][0]["levels"][0]["clear"] = "11"
    eq(error(d), "/config.json: rules[0].levels[0].clear: must be <= set (10) for a high threshold, got 11")
    d = good()
    d["rules"][0]["levels"][1]["level"] = "IV_BLUE"
    eq(error(d), "/config.json: rules[0].levels[1].level: IV_BLUE must be higher than the level before it")
    d = good()
    d["rules"][0]["levels"][1]["level"] = "purple"
    true(error(d).startswith("/config.json: rules[0].levels[1].level: unknown level 'purple'; use one of IV_BLUE"))
    d = good()
    d["rules"][0]["levels"] = []
    eq(error(d), "/config.json: rules[0].levels: needs at least one level")
    d = good()
    d["rules"][0]["hysteresis"] = "1"
    true(error(d).startswith("/config.json: rules[0].hysteresis: unknown key"))


def test_topic_levels_and_catalogue_limits():
    d = good()
    d["site"] = "a/b"
    true(error(d).startswith("/config.json: site: 'a/b': 1-64 letters, digits"))
    for bad in ("-x", "a b", "a+", "x" * 65, "\u6c34\u5e93", ".a"):
        d = good()
        d["node_id"] = bad
        true(error(d).startswith("/config.json: node_id: "), bad)
    for bad in ("yujing/v1/", "/yujing", "a//b", "a/+/b", "a/#", "has space", "x" * 129):
        d = good()
        d["mqtt"]["prefix"] = bad
        true(error(d).startswith("/config.json: mqtt.prefix: "), bad)
    d = good()
    d["mqtt"]["prefix"] = "p/" + "x" * 120
    d["site"] = "s" * 64
    d["node_id"] = "n" * 64
    true("topics would be longer than 256 bytes" in error(d))
    d = good()
    d["mqtt"]["client_id"] = "has space"
    eq(error(d), "/config.json: mqtt.client_id: printable ASCII only (no spaces)")
    d = good()
    d["mqtt"]["host"] = "10.0.0.2 "
    true("mqtt.host" in error(d))
    d = good()
    d["sensors"].append({"kind": "adc", "device": "crack", "point": "opening", "pin": 35})
    eq(error(d), "/config.json: sensors: point crack/opening appears twice")
    d = good()
    d["sensors"][3]["points"][1]["address"] = 200
    Config(d)  # 200 alone is fine for function 4 ...
    d["sensors"][3]["points"][1]["function"] = 3  # ... but one function 3 request cannot span 1..201
    true(error(d).startswith("/config.json: sensors[3].points: function 3 spans 201 registers"))


def test_secrets_file():
    s = Secrets({"mqtt_username": "n7", "mqtt_password": "pw"})
    eq((s.mqtt_username, s.mqtt_password, s.wifi_password), ("n7", "pw", None))
    eq(
        str(raises(ConfigError, Secrets, {"mqtt_pass": "x"})),
        "/secrets.json: mqtt_pass: unknown key (known here: wifi_password, mqtt_username, mqtt_password, command_key)",
    )
    eq(str(raises(ConfigError, Secrets, ["x"])), "/secrets.json: (top level): expected an object")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def test_missing_and_malformed_files_name_the_file():
    remove("/config.json")
    e = raises(ConfigError, config.load)
    eq(e.file, "/config.json")
    true("cannot read the file" in str(e))
    write("/config.json", '{"node_id": "x", ')
    eq(str(raises(ConfigError, config.load)), "/config.json: not valid JSON")
    write("/config.json", json.dumps(good()))
    remove("/secrets.json")
    eq(raises(ConfigError, config.load).file, "/secrets.json")


def test_safe_state_logs_blinks_and_retries_instead_of_crashing():
    remove("/config.json")
    board = SimBoard()
    board.quiet = True
    eq(app.main(board, retry_ms=4000, max_tries=2), None)
    eq(len(board.logs), 2)
    true(board.logs[0].startswith("yujing: config error: /config.json: cannot read the file"), board.logs[0])
    led = board.pins[2].history
    eq(led[:7], [0, 1, 0, 1, 0, 1, 0], "starts off, then three short flashes")
    eq(len(led), 13, "one retry period (2 x 2 s) of the pattern between the two tries")
    eq(board.resets, 0)
    eq(board.clock.slept, 4000)


def test_safe_state_recovers_once_provisioning_fixes_the_file():
    write("/config.json", "{")
    write("/secrets.json", "{}")
    board = SimBoard()
    board.quiet = True
    got = app.load(board, retry_ms=2000, max_tries=1)
    eq(got, None)
    d = good()
    d["mode"] = "awake"
    write("/config.json", json.dumps(d))
    cfg, sec = app.load(board, retry_ms=2000, max_tries=1)
    eq(cfg.node_id, "slope-07")


def test_hw_layer_imports_and_keeps_time_without_hardware():
    import time

    from yujing_node.hw import Board

    board = Board()
    eq(board.path("/config.json"), "/config.json")
    now = board.clock.epoch_ms()
    true(abs(now - time.time() * 1000) < 5000, "epoch ms, 1970 epoch")
    true(board.clock.valid())
    raises(ImportError, board.pin_out, 2)  # no machine module on a host


run(globals())
