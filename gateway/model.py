"""The values that flow through the gateway. They are defined on the drivers' side
(`device_drivers.model`: drivers produce readings), so imports run one way, gateway → device_drivers."""

from device_drivers.model import PointInfo, Quality, Reading, Value, modbus_exception_quality, quality_name

__all__ = ["PointInfo", "Quality", "Reading", "Value", "modbus_exception_quality", "quality_name"]
