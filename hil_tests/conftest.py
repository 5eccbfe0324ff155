"""The HIL scenarios use the same real broker fixtures as the test suite."""

from tests.conftest import mosquitto, private_mosquitto  # noqa: F401 (fixtures)
