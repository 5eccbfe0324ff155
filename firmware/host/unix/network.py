"""Fake `network` for the unix port: the host's own network stands in for the radio, so a station is
connected as soon as it is asked to connect (PPP likewise). Real sockets do the rest."""

STA_IF = 0
AP_IF = 1


class WLAN:
    def __init__(self, interface=STA_IF):
        self._active = False
        self._connected = False

    def active(self, on=None):
        if on is None:
            return self._active
        self._active = bool(on)

    def connect(self, ssid=None, key=None, **kw):
        self._connected = self._active

    def disconnect(self):
        self._connected = False

    def isconnected(self):
        return self._connected

    def ifconfig(self, *a):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")


class PPP:
    def __init__(self, stream):
        self._connected = False

    def active(self, on=None):
        return True

    def connect(self, **kw):
        self._connected = True

    def isconnected(self):
        return self._connected
