"""Yujing gateway agent: drivers → readings → rules/alarms → durable spool → uplink."""

__version__ = "0.1.0"
