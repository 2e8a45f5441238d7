"""Unit tests never start Ray: ``ray.init`` fails loudly here (integration tests start it)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a unit test started Ray: move it to tests/integration/")

    monkeypatch.setattr(ray, "init", refuse)
