"""A failed job's public error: storage faults generic, server details redacted."""

from __future__ import annotations

from orchestrator.job_errors import public_failure, redact
from storage.errors import ObjectStoreUnavailable


class _TaskError(Exception):  # shaped like Ray's RayTaskError: the original is ``cause``
    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray task failed")
        self.cause = cause


def test_store_faults_become_one_generic_sentence_keeping_the_stage() -> None:
    fault = ObjectStoreUnavailable(
        "could not reach s3://team-bucket/lf/staging/x at "
        "http://10.0.0.7:9000 (/var/lib/lorafleet/cache)"
    )
    msg = f"publish failed: {fault}"
    public = public_failure(msg, fault)
    assert public.startswith("publish failed: storage failed (ObjectStoreUnavailable)")
    for leak in ("s3://", "10.0.0.7", "/var/lib", "team-bucket"):
        assert leak not in public
    wrapped = _TaskError(fault)  # a worker's fault, as Ray delivers it
    assert "storage failed" in public_failure("training failed: ray task failed", wrapped)
    # a worker's report that arrives as text only
    assert "storage failed" in public_failure("TrainingError: ObjectStoreUnavailable: boom")


def test_other_errors_keep_their_words_without_paths_hosts_or_uris() -> None:
    text = ("DatasetError: /home/u/.lorafleet/cache/blobs/ab12: line 3: no 'messages'\n"
            "traceback line")  # fmt: skip
    assert public_failure(text) == "DatasetError: <path>: line 3: no 'messages'"
    assert redact("see file:///tmp/x and db at localhost:5432") == "see <uri> and db at <host>"
    assert public_failure("bad spec: seq_len must be ≥ 8") == "bad spec: seq_len must be ≥ 8"
