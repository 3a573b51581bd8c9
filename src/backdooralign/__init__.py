"""Backdoor Enhanced Safety Alignment."""

__version__ = "0.1.0"
