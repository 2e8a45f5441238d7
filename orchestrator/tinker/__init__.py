"""The Tinker-compatible training API: wire formats (``wire``), sessions (``service``)."""
