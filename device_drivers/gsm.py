"""SMS for a GSM/4G modem in PDU mode (3GPP TS 23.040 SMS-SUBMIT, TS 23.038 UCS-2), and the AT modem's
final result codes (3GPP TS 27.005/27.007). Pure, no I/O (gateway/uplink/sms.py talks to the modem).

Text goes as UCS-2 (data coding scheme 0x08), so Chinese arrives intact: 70 UTF-16 code units fit one
message; a longer text is split into parts of 67 units, each with a concatenation header (IEI 00: a
reference number, the part count and the part's number) that phones use to show them as one. A split never
falls inside a surrogate pair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SINGLE_UNITS = 70
PART_UNITS = 67  # 6 bytes of user data header leave 134 bytes: 67 UTF-16 code units
CTRL_Z = b"\x1a"


@dataclass(frozen=True)
class Pdu:
    hex: str  # the whole PDU as the modem takes it (SMSC part "00": the SIM's service centre)
    tpdu_length: int  # what AT+CMGS=<n> says: the octets after the SMSC part


def _units(text: str) -> list[bytes]:
    """The text as UTF-16-BE code units grouped per character (a surrogate pair stays together)."""
    return [ch.encode("utf-16-be") for ch in text]


def split_units(text: str) -> list[bytes]:
    """The text's UCS-2/UTF-16 bytes, cut into message parts."""
    chars = _units(text)
    total = sum(len(c) // 2 for c in chars)
    if total <= SINGLE_UNITS:
        return [b"".join(chars)]
    parts: list[bytes] = []
    current, units = bytearray(), 0
    for c in chars:
        n = len(c) // 2
        if units + n > PART_UNITS:
            parts.append(bytes(current))
            current, units = bytearray(), 0
        current += c
        units += n
    if current:
        parts.append(bytes(current))
    return parts


def encode_number(number: str) -> bytes:
    """Destination address: length in digits, type (0x91 international with '+', else 0x81), swapped BCD."""
    digits = number.lstrip("+")
    if not digits.isdigit() or not 3 <= len(digits) <= 20:
        raise ValueError(f"{number!r} is not a phone number (digits, optionally a leading +)")
    kind = 0x91 if number.startswith("+") else 0x81
    padded = digits + ("F" if len(digits) % 2 else "")
    swapped = "".join(padded[i + 1] + padded[i] for i in range(0, len(padded), 2))
    return bytes([len(digits), kind]) + bytes.fromhex(swapped)


def encode_submit(number: str, text: str, *, reference: int = 0) -> list[Pdu]:
    """The PDUs (one per part) that send `text` to `number`. `reference` (0..255) ties the parts together."""
    parts = split_units(text)
    total = len(parts)
    out = []
    for n, data in enumerate(parts, start=1):
        udh = bytes([0x05, 0x00, 0x03, reference & 0xFF, total, n]) if total > 1 else b""
        first = 0x11 | (0x40 if udh else 0)  # SMS-SUBMIT, relative validity period (+ user data header)
        tpdu = bytes([first, 0x00]) + encode_number(number) + bytes([0x00, 0x08, 0xAA])  # PID, DCS UCS-2, 4 days
        user_data = udh + data
        tpdu += bytes([len(user_data)]) + user_data
        out.append(Pdu("00" + tpdu.hex().upper(), len(tpdu)))
    return out


# ---------------------------------------------------------------------------------------------- AT replies

FINAL = re.compile(r"^(OK|ERROR|NO CARRIER|\+CME ERROR: *(.+)|\+CMS ERROR: *(.+))$")
CMS_MEANING = {
    "8": "operator determined barring (no credit? barred?)",
    "10": "call barred",
    "21": "short message transfer rejected (no credit?)",
    "27": "destination out of service",
    "28": "unidentified subscriber (is the SIM active?)",
    "29": "facility rejected",
    "38": "network out of order",
    "41": "temporary failure",
    "42": "congestion",
    "47": "resources unavailable",
    "50": "requested facility not subscribed",
    "69": "requested facility not implemented",
    "304": "invalid PDU mode parameter",
    "310": "SIM not inserted",
    "311": "SIM PIN required",
    "330": "SMSC address unknown",
    "331": "no network service",
    "332": "network timeout",
    "500": "unknown error",
}
CME_MEANING = {"10": "SIM not inserted", "11": "SIM PIN required", "12": "SIM PUK required", "13": "SIM failure",
               "14": "SIM busy", "15": "SIM wrong", "16": "incorrect password", "30": "no network service"}


def explain(final: str) -> str:
    """A final result code in words, for a log line or a gateway fault."""
    m = FINAL.match(final.strip())
    if not m:
        return final
    if m.group(2):
        code = m.group(2).strip()
        return f"+CME ERROR: {code} ({CME_MEANING.get(code, 'modem error')})"
    if m.group(3):
        code = m.group(3).strip()
        return f"+CMS ERROR: {code} ({CMS_MEANING.get(code, 'message refused')})"
    return final


def registered(creg_line: str) -> bool | None:
    """From a `+CREG: n,stat` (or +CEREG/+CGREG) line: registered at home (1) or roaming (5)?"""
    m = re.match(r"^\+C[EG]?REG: *\d+, *(\d+)", creg_line.strip())
    return None if m is None else m.group(1) in ("1", "5")
