"""Yujing node firmware (MicroPython). See firmware/README.md for the design requirements."""

VERSION = "0.1.0"
