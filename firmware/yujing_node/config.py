"""Reads and validates /config.json and /secrets.json, the files provisioning writes to the board.

Everything is checked here, once, before any hardware is touched: types, ranges, unknown keys,
sensor options (each driver validates its own block) and rule point references. A problem raises
ConfigError naming the file and the key path, e.g.
    /config.json: sensors[1].scale: expected a decimal string such as "0.01"
"""

import binascii
import json

from . import dec

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


CONFIG_FILE = "/config.json"
SECRETS_FILE = "/secrets.json"
LEVELS = ("blue", "yellow", "orange", "red")  # IV .. I; level numbers 1 .. 4
LEVEL_NAMES = ("IV_BLUE", "III_YELLOW", "II_ORANGE", "I_RED")  # the gateway's names
TLS_FILES = {"ca": "/ca.der", "cert": "/cert.der", "key": "/key.der"}  # mqtt.<k>_file defaults (load_tls)
_MAX_POINTS = const(255)
_REQ = object()  # sentinel: the key is required


def _ident(v):
    """The gateway's id rule (gateway.config.ID_RE) without `re`: ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$."""
    if not 1 <= len(v) <= 64:
        return False
    for i, c in enumerate(v):
        o = ord(c)
        alnum = 48 <= o <= 57 or 65 <= o <= 90 or 97 <= o <= 122
        if not alnum and (i == 0 or c not in "_.-"):
            return False
    return True


def _prefix_ok(v):
    """A topic prefix: printable ASCII levels, none empty, no wildcards."""
    for c in v:
        if not 33 <= ord(c) <= 126 or c in "+#":
            return False
    return "" not in v.split("/")


_TOPIC_MAX = const(256)  # mqtt.Client refuses longer topics


class ConfigError(Exception):
    def __init__(self, file, field, msg):
        super().__init__("%s: %s: %s" % (file, field, msg) if field else "%s: %s" % (file, msg))
        self.file = file
        self.field = field


class Fields:
    """One JSON object under validation. Every getter records the key, so done() can reject the rest."""

    def __init__(self, file, where, d):
        if not isinstance(d, dict):
            raise ConfigError(file, where or "(top level)", "expected an object")
        self.file = file
        self.where = where
        self.d = d
        self.seen = []

    def path(self, key):
        return "%s.%s" % (self.where, key) if self.where else key

    def error(self, key, msg):
        return ConfigError(self.file, self.path(key), msg)

    def _get(self, key, default):
        self.seen.append(key)
        if key in self.d and self.d[key] is not None:
            return self.d[key], True
        if default is _REQ:
            raise self.error(key, "missing")
        return default, False

    def text(self, key, default=_REQ, topic_safe=False, max_len=256):
        v, given = self._get(key, default)
        if not given:
            return v
        if not isinstance(v, str) or not v:
            raise self.error(key, "expected a non-empty string")
        if len(v) > max_len:
            raise self.error(key, "longer than %d characters" % max_len)
        if topic_safe and not _ident(v):
            raise self.error(
                key, "%r: 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit (as the gateway's ids; "
                "it is an MQTT topic level)" % v
            )
        return v

    def integer(self, key, default=_REQ, lo=None, hi=None):
        v, given = self._get(key, default)
        if not given:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, "expected an integer")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self.error(key, "%d is outside %s..%s" % (v, lo, hi))
        return v

    def flag(self, key, default=_REQ):
        v, given = self._get(key, default)
        if given and not isinstance(v, bool):
            raise self.error(key, "expected true or false")
        return v

    def decimal(self, key, default=_REQ):
        """A decimal string ("0.01") or an integer, as (mantissa, exponent)."""
        v, given = self._get(key, default)
        if not given:
            return v
        if isinstance(v, float):
            raise self.error(key, 'write it as a string ("%s"), so it stays an exact decimal' % v)
        try:
            return dec.parse(v)
        except ValueError:
            raise self.error(key, 'expected a decimal string such as "0.01"') from None

    def choice(self, key, options, default=_REQ):
        v, given = self._get(key, default)
        if given and v not in options:
            raise self.error(key, "%r is not one of %s" % (v, ", ".join(options)))
        return v

    def obj(self, key, default=_REQ):
        v, given = self._get(key, default)
        if not given:
            return v
        return Fields(self.file, self.path(key), v)

    def items(self, key, default=_REQ):
        """A list of objects, as Fields named key[i]."""
        v, given = self._get(key, default)
        if not given:
            return v
        if not isinstance(v, list):
            raise self.error(key, "expected a list")
        return [Fields(self.file, "%s[%d]" % (self.path(key), i), x) for i, x in enumerate(v)]

    def done(self):
        for k in self.d:
            if k not in self.seen:
                raise self.error(k, "unknown key (known here: %s)" % ", ".join(self.seen))


def parse_level(f, key, default=_REQ):
    """A level by name ("III_YELLOW") or colour ("yellow"), any case, as the gateway accepts: 1..4."""
    v = f.text(key, default)
    if not isinstance(v, str):
        return v
    t = v.strip().upper()
    for i in range(4):
        if t == LEVELS[i].upper() or t == LEVEL_NAMES[i]:
            return i + 1
    raise f.error(
        key, "unknown level %r; use one of %s or a colour (blue, yellow, orange, red)" % (v, ", ".join(LEVEL_NAMES))
    )


class Rule:
    """A validated threshold rule (the gateway's `threshold` kind, without time-based options)."""

    def __init__(self, f, index_of):
        ref = f.text("point")
        if ref not in index_of:
            raise f.error("point", "no point %r (known: %s)" % (ref, ", ".join(index_of)))
        self.point = index_of[ref]
        self.id = f.text("id", ref)
        self.latch = f.flag("latch", False)  # hold the highest level reached until acknowledged (an "ack" command)
        self.high = f.choice("direction", ("high", "low"), "high") == "high"
        self.on_delay = f.integer("on_delay_count", 1, 1, 255)
        self.off_delay = f.integer("off_delay_count", 1, 1, 255)
        self.raise_only = f.choice("out_of_range", ("fault", "raise_only"), "fault") == "raise_only"
        rungs = f.items("levels")
        if not rungs:
            raise f.error("levels", "needs at least one level")
        self.levels = []  # (level, set, clear) with set/clear as (mantissa, exponent, float)
        for lt in rungs:
            lv = parse_level(lt, "level")
            sm, se = lt.decimal("set")
            cm, ce = lt.decimal("clear", (sm, se))
            lt.done()
            c = dec.cmp(cm, ce, sm, se)
            if (self.high and c > 0) or (not self.high and c < 0):
                raise lt.error(
                    "clear",
                    "must be %s set (%s) for a %s threshold, got %s"
                    % (
                        "<=" if self.high else ">=",
                        dec.to_str(sm, se),
                        "high" if self.high else "low",
                        dec.to_str(cm, ce),
                    ),
                )
            for pl, ps, _ in self.levels:
                if lv <= pl:
                    raise lt.error("level", "%s must be higher than the level before it" % LEVEL_NAMES[lv - 1])
                c = dec.cmp(sm, se, ps[0], ps[1])
                if (self.high and c <= 0) or (not self.high and c >= 0):
                    raise lt.error(
                        "set",
                        "%s must be %s %s of a lower level"
                        % (dec.to_str(sm, se), "above" if self.high else "below", dec.to_str(ps[0], ps[1])),
                    )
            self.levels.append((lv, (sm, se, sm * 10.0**se), (cm, ce, cm * 10.0**ce)))
        # limits: the range a "threshold" command may move this rule's set and clear values within; without
        # it the rule's thresholds cannot be changed remotely
        self.limits = None
        lim = f.obj("limits", None)
        if lim is not None:
            self.limits = (lim.decimal("min"), lim.decimal("max"))
            lim.done()
            if dec.cmp(self.limits[0][0], self.limits[0][1], self.limits[1][0], self.limits[1][1]) > 0:
                raise lim.error("max", "below min")
        f.done()


class Config:
    def __init__(self, d, file=CONFIG_FILE):
        from . import sensors

        f = Fields(file, "", d)
        self.node_id = f.text("node_id", topic_safe=True)
        self.site = f.text("site", topic_safe=True)
        self.period_ms = 1000 * f.integer("sample_period_s", lo=1, hi=86400)
        self.sleep = f.choice("mode", ("awake", "sleep"), "awake") == "sleep"
        self.watchdog_ms = 1000 * f.integer("watchdog_s", 60, 0, 3600)
        self.publish_timeout_ms = 1000 * f.integer("publish_timeout_s", 5, 1, 120)

        m = f.obj("mqtt")
        self.host = m.text("host", max_len=253)
        if " " in self.host:
            raise m.error("host", "a host name or address has no spaces")
        self.tls = m.flag("tls", False)  # then ca_file, cert_file, key_file: DER files on the flash (load_tls)
        self.port = m.integer("port", 8883 if self.tls else 1883, 1, 65535)
        self.tls_files = None
        if self.tls:
            self.tls_files = {k: m.text(k + "_file", d) for k, d in TLS_FILES.items()}
        else:
            for k in ("ca_file", "cert_file", "key_file"):
                if m.d.get(k) is not None:
                    raise m.error(k, "only with \"tls\": true")
                m.seen.append(k)
        self.prefix = m.text("prefix", "yujing/v1", max_len=128)
        if not _prefix_ok(self.prefix):
            raise m.error("prefix", "%r: printable ASCII topic levels, none empty, no '+' or '#'" % self.prefix)
        if len(self.prefix) + len(self.site) + len(self.node_id) + len("/birth") + 2 > _TOPIC_MAX:
            raise m.error("prefix", "topics would be longer than %d bytes" % _TOPIC_MAX)
        self.keepalive_s = m.integer("keepalive_s", 60, 0, 65535)
        self.client_id = m.text("client_id", "yujing-" + self.node_id, max_len=128)
        for c in self.client_id:
            if not (33 <= ord(c) <= 126):
                raise m.error("client_id", "printable ASCII only (no spaces)")
        self.commands = m.flag("commands", False)
        # alarm changes as alarm messages plus the retained alarms state (off: the node only alarms locally)
        self.alarm_events = m.flag("alarm_events", True)
        m.done()

        n = f.obj("network", None)
        self.net = {"type": "none"}
        if n is not None:
            t = n.choice("type", ("wifi", "ppp", "none"))
            self.net = {"type": t, "timeout_ms": 1000 * n.integer("timeout_s", 30, 1, 600)}
            if t == "wifi":
                self.net["ssid"] = n.text("ssid")
            elif t == "ppp":
                self.net["uart"] = uart_fields(n.obj("uart"))
                self.net["apn"] = n.text("apn", None)
            n.done()

        self.led = _pin(f.obj("status_led", None))
        self.alarm_pin = None
        self.alarm_level = 1
        a = f.obj("alarm_output", None)
        if a is not None:
            self.alarm_level = parse_level(a, "level", 1)
            self.alarm_pin = _pin(a)

        b = f.obj("buffer", None)
        self.ring_blocks, self.ring_block_bytes, self.ring_sync_cycle = 64, 512, False
        if b is not None:
            self.ring_blocks = b.integer("blocks", 64, 2, 4096)
            self.ring_block_bytes = b.integer("block_bytes", 512, 64, 4096)
            self.ring_sync_cycle = b.choice("sync", ("block", "cycle"), "block") == "cycle"
            b.done()

        self.sensors = [sensors.parse(s) for s in f.items("sensors")]
        self.catalogue = []
        for s in self.sensors:
            self.catalogue.extend(s.points)
        if not self.catalogue:
            raise f.error("sensors", "no sensor configured")
        if len(self.catalogue) > _MAX_POINTS:
            raise f.error("sensors", "%d points; a node has at most %d" % (len(self.catalogue), _MAX_POINTS))
        index_of = {}
        for i, p in enumerate(self.catalogue):
            ref = p[0] + "/" + p[1]
            if ref in index_of:
                raise f.error("sensors", "point %s appears twice" % ref)
            index_of[ref] = i
        self.rules = [Rule(r, index_of) for r in f.items("rules", [])]
        f.done()


def _pin(f):
    if f is None:
        return None
    p = (f.integer("pin", lo=0, hi=48), f.flag("active_low", False))
    f.done()
    return p


def uart_fields(u):
    """UART settings shared by Modbus sensors and the PPP modem."""
    d = {
        "id": u.integer("id", 1, 0, 3),
        "tx": u.integer("tx", None, 0, 48),
        "rx": u.integer("rx", None, 0, 48),
        "baud": u.integer("baud", 9600, 300, 1000000),
        "parity": u.choice("parity", ("none", "even", "odd"), "none"),
        "stop": u.integer("stop", 1, 1, 2),
        "de": u.integer("de", None, 0, 48),
    }
    u.done()
    return d


class Secrets:
    def __init__(self, d, file=SECRETS_FILE):
        f = Fields(file, "", d)
        self.wifi_password = f.text("wifi_password", None, max_len=64)
        self.mqtt_username = f.text("mqtt_username", None, max_len=256)
        self.mqtt_password = f.text("mqtt_password", None, max_len=256)
        # the node's own key for signed commands (COSE_Mac0, HMAC-SHA256): 32 bytes as 64 hex digits
        self.command_key = None
        key = f.text("command_key", None, max_len=64)
        if key is not None:
            try:
                self.command_key = binascii.unhexlify(key) if len(key) == 64 else None
            except ValueError:
                pass
            if self.command_key is None:
                raise f.error("command_key", "expected 64 hex digits (a 32-byte key)")
        f.done()


def read_json(path):
    """The parsed file, or ConfigError saying the file is missing or not JSON."""
    try:
        with open(path) as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(
            path, "", "cannot read the file (missing? errno %s): provision it" % (e.args[0] if e.args else "?")
        ) from None
    try:
        return json.loads(text)
    except ValueError:
        raise ConfigError(path, "", "not valid JSON") from None


def load_tls(cfg, path=lambda p: p, config_path=CONFIG_FILE):
    """{"ca", "cert", "key"}: the TLS files' bytes (cert and key None when the key file is absent: a broker
    that takes passwords over TLS), checked to be DER, which is all this MicroPython's mbedTLS parses."""
    out = {}
    for k, name in cfg.tls_files.items():
        field = "mqtt.%s_file" % k
        try:
            with open(path(name), "rb") as fh:
                data = fh.read()
        except OSError:
            if k != "ca" and name == TLS_FILES[k]:
                out[k] = None  # the default names and no file: no client certificate
                continue
            raise ConfigError(config_path, field, "%s: cannot read the file (missing?): provision it" % name) from None
        if not data or data[0] != 0x30:
            raise ConfigError(
                config_path, field, "%s: not DER (a PEM file? convert it: openssl x509|pkey -outform DER)" % name
            )
        out[k] = data
    if (out["cert"] is None) != (out["key"] is None):
        raise ConfigError(
            config_path, "mqtt.cert_file", "a client certificate needs its key, and a key its certificate"
        )
    return out


def load(config_path=CONFIG_FILE, secrets_path=SECRETS_FILE, path=lambda p: p):
    """(Config, Secrets). Provisioning always writes both files; secrets.json may be {}."""
    cfg = Config(read_json(config_path), config_path)
    cfg.tls = load_tls(cfg, path, config_path) if cfg.tls else None
    return cfg, Secrets(read_json(secrets_path), secrets_path)
