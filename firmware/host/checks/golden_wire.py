# Encodes the cases in /data/cases.json with the firmware's wire module under real MicroPython
# and prints "<name> <hex>" per case; tests/test_firmware_cbor.py compares each with
# gateway/wire.py's encoding of the same readings.
import binascii
import json
import struct

from yujing_node import dec
from yujing_node.cbor import Writer
from yujing_node.records import DEC, FALSE, FLOAT, INT, NULL, TRUE, Batch
from yujing_node.wire import encode_birth, encode_data, encode_death


def batch(readings):
    b = Batch(len(readings))
    for r in readings:
        point, ts, kind, arg = r[0], r[1], r[2], r[3:]
        q = arg[-1]
        if kind == "null":
            b.add(point, ts, NULL, 0, 0, q)
        elif kind == "bool":
            b.add(point, ts, TRUE if arg[0] else FALSE, 0, 0, q)
        elif kind == "int":
            b.add(point, ts, INT, 0, arg[0], q)
        elif kind == "f64":
            b.add(point, ts, FLOAT, 0, struct.unpack(">d", binascii.unhexlify(arg[0]))[0], q)
        elif kind == "scaled":  # raw register * scale + offset, as a driver computes it
            lin = dec.Linear(dec.parse(arg[1]), dec.parse(arg[2]))
            b.add(point, ts, DEC, lin.exp, lin.mantissa(arg[0]), q)
        elif kind == "dec":
            m, e = dec.parse(arg[0])
            b.add(point, ts, DEC, e, m, q)
        else:
            raise ValueError(kind)
    return b


w = Writer(4096)
with open("/data/cases.json") as f:
    cases = json.loads(f.read())
for c in cases:
    k = c["kind"]
    if k == "data":
        out = encode_data(w, c["session"], c["seq"], batch(c["readings"]), c["historical"])
    elif k == "birth":
        cat = [tuple(p) for p in c["catalogue"]]
        out = encode_birth(
            w, c["session"], c["ts"], c["site"], c["node"], c["software"], cat, c["dropped"], c["back_at"]
        )
    else:
        out = encode_death(w, c["session"], c["reason"], c["ts"], c["back_at"])
    print(c["name"], binascii.hexlify(bytes(out)).decode())
