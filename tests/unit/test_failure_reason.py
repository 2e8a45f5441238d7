"""What a failed run reports: the worker's own error, not Ray's wrapper headline."""

from __future__ import annotations

from workers.errors import DatasetError
from workers.training.ray_train import failure_reason


class _TaskError(Exception):  # shaped like Ray's RayTaskError: the original is ``cause``
    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray task failed\n  Traceback ...")
        self.cause = cause


class _GroupError(Exception):  # shaped like Ray Train's WorkerGroupError
    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors:\n  ...")
        self.worker_failures = failures


def test_the_lowest_ranks_own_error_is_reported():
    err = _GroupError({1: _TaskError(ValueError("later")),
                       0: _TaskError(DatasetError("no row fits seq_len=2\ndetails"))})  # fmt: skip
    assert failure_reason(err) == "DatasetError: no row fits seq_len=2"


def test_plain_and_chained_errors():
    assert failure_reason(RuntimeError("boom\nmore")) == "RuntimeError: boom"
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer") from inner
    except RuntimeError as exc:
        assert failure_reason(exc) == "KeyError: 'inner'"
