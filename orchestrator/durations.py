"""Durations as people type them (``30d``, ``12h``, ``15m``, ``90s``): one parse for the CLI
(``tokens create --expires-in``, ``usage --since``, ``adapters list --idle``) and the API."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, option: str = "--expires-in") -> float:
    """``30d``, ``12h``, ``15m`` or ``90s`` in seconds.

    Raises:
        ValueError: anything else (the message names ``option`` and what is accepted).
    """
    m = re.fullmatch(r"([0-9]{1,6})([smhd])", text.strip())
    if m is None or int(m[1]) == 0:
        raise ValueError(f"{option} {text!r}: use a positive number and s, m, h or d (30d)")
    return int(m[1]) * _UNITS[m[2]]
