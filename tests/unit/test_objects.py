"""The API's object shapes have one owner, ``orchestrator.objects``: the routes document the
same classes, builders produce exactly their fields, and no other module writes an object's
``"object": "…"`` by hand (a second hand-written copy is how shapes drift apart)."""

from __future__ import annotations

import datetime as dt
import re
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from orchestrator import objects
from orchestrator.api import schemas

ROOT = Path(__file__).resolve().parents[2]


def _shapes() -> dict[str, type[objects.Shape]]:
    """Every model in objects with an ``object`` kind, by "kind ClassName"."""
    found: dict[str, type[objects.Shape]] = {}
    for value in vars(objects).values():
        if isinstance(value, type) and issubclass(value, objects.Shape):
            field = value.model_fields.get("object")
            if field is not None:
                (kind,) = typing.get_args(field.annotation)
                found.setdefault(f"{kind} {value.__name__}", value)
    return found


def test_the_routes_document_the_classes_objects_builds() -> None:
    for kind, shape in _shapes().items():
        if kind == "pack Pack":
            continue  # the CLI shows packs; the API has no route for them (yet)
        assert getattr(schemas, shape.__name__) is shape, kind


def test_no_module_but_objects_writes_an_object_by_hand() -> None:
    kinds = {k.split()[0] for k in _shapes()}
    assert {"fine_tuning.job", "adapter", "file", "token", "adapter.spectrum",
            "fine_tuning.job.checkpoint"} <= kinds  # fmt: skip
    offenders = []
    for path in [*(ROOT / "orchestrator").rglob("*.py"), *(ROOT / "storage").rglob("*.py")]:
        if path.name == "objects.py" and path.parent.name == "orchestrator":
            continue
        for kind in re.findall(r"""["']object["']\s*:\s*["']([\w.]+)["']""", path.read_text()):
            if kind in kinds:
                offenders.append(f"{path.relative_to(ROOT)}: {kind}")
    assert offenders == []


def test_a_builder_emits_exactly_its_models_fields() -> None:
    t = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    token = SimpleNamespace(id=3, namespace="team-a", name="ci", scope="read", created_at=t,
                            expires_at=None, revoked_at=None)  # fmt: skip
    body = objects.token_object(token)  # type: ignore[arg-type]
    assert list(body) == list(objects.Token.model_fields)
    assert body["object"] == "token" and body["created_at"] == t.timestamp()
    fresh = objects.token_object(token, secret="lf-secret")  # type: ignore[arg-type]
    assert fresh["token"] == "lf-secret" and set(fresh) - set(body) == {"token"}
    # a record that does not fit its shape fails where it is built, not in a client
    with pytest.raises(ValidationError):
        objects.token_object(SimpleNamespace(**{**vars(token), "id": "x"}))  # type: ignore[arg-type]


def test_usage_has_the_same_keys_summed_or_per_minute() -> None:
    t = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC)
    u = SimpleNamespace(namespace="a", model="a/x:1", requests=2, prompt_tokens=3,
                        completion_tokens=4, total_tokens=7, minute=t)  # fmt: skip
    summed = objects.usage_object(u)  # type: ignore[arg-type]
    minute = objects.usage_object(u, per_minute=True)  # type: ignore[arg-type]
    assert set(summed) == set(minute)
    assert summed["first_minute"] == minute["minute"] == int(t.timestamp())
    assert summed["minute"] is None and minute["first_minute"] is None


def test_the_schema_marks_every_object_field_present() -> None:
    """Fields with defaults (``object``) are always in the output, and the schema says so."""
    schema = objects.Job.model_json_schema(mode="serialization")
    assert "object" in schema["required"] and "progress" in schema["required"]


def test_a_job_object_carries_its_method_and_warm_start() -> None:
    now = dt.datetime.now(dt.timezone.utc)
    job = SimpleNamespace(
        id="ftjob-1", namespace="team", name="j", state="queued", status_reason=None,
        priority=0, attempts=0, error=None, pack_id=None, created_at=now, started_at=None,
        finished_at=None,
        spec={"base_model": "tiny", "training_data": "file-x", "init_adapter": "team/sft:2",
              "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}},
    )  # fmt: skip
    shown = objects.job_object(job)  # type: ignore[arg-type]
    assert shown["method"] == {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2}}}
    assert shown["init_adapter"] == "team/sft:2"
    plain = objects.job_object(SimpleNamespace(**{**vars(job), "spec": {}}))  # type: ignore[arg-type]
    assert plain["method"] == {"type": "supervised"} and plain["init_adapter"] is None
