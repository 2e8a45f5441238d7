"""The job spec's ``method`` (OpenAI's shape), ``lora.variant`` and its old spelling,
``init_adapter``, and the one mapping to the trainer's ``Method``."""

from __future__ import annotations

import pytest

from orchestrator.spec import SpecError, deprecated_spellings, parse_spec
from workers.training.methods import Method

BASE = {"name": "j", "namespace": "team", "base_model": "tiny",
        "training_data": "file-" + "a" * 24, "output_adapter": "team/j"}  # fmt: skip
JUDGE = {"type": "score_model", "model": "team/judge", "input": [
    {"role": "user", "content": "{{sample.output_text}}"}]}  # fmt: skip


def test_methods_map_to_the_trainer_and_back():
    dpo = parse_spec({**BASE, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}}})
    assert Method.from_dict(dpo.method.as_dict()) == Method(type="dpo", beta=0.3)
    rl = parse_spec({**BASE, "method": {"type": "reinforcement", "reinforcement": {
        "grader": JUDGE, "hyperparameters": {"group_size": 6}}}})  # fmt: skip
    m = Method.from_dict(rl.method.as_dict())
    assert (m.type, m.group_size, m.max_new_tokens, m.grader) == ("reinforcement", 6, 32, JUDGE)
    assert parse_spec(BASE).method.as_dict() == {"type": "supervised"}


@pytest.mark.parametrize(("method", "message"), [
    ({"type": "sft"}, "method.type"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, "method.dpo.hyperparameters.beta"),
    ({"type": "dpo", "reinforcement": {"grader": JUDGE}}, "does not belong"),
    ({"type": "reinforcement"}, "needs its section"),
    ({"type": "reinforcement", "reinforcement": {"grader": {"type": "python"}}},
     "unknown grader type 'python'"),
    ({"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}},
     "set them under `training`"),
    ({"type": "reinforcement", "reinforcement": {"grader": {**JUDGE, "model": "other/judge"}}},
     "job's namespace"),
])  # fmt: skip
def test_bad_methods_name_the_field(method, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({**BASE, "method": method})


def test_lora_method_is_the_old_spelling_of_variant():
    data = {**BASE, "lora": {"r": 4, "method": "dora"}}
    spec = parse_spec(data)
    assert spec.lora.variant == "dora" and "method" not in spec.lora.model_dump()
    assert "lora.method is now lora.variant" in deprecated_spellings(data)[0]
    assert deprecated_spellings({**BASE, "lora": {"variant": "dora"}}) == []
    with pytest.raises(SpecError, match=r"lora\.variant"):
        parse_spec({**BASE, "lora": {"method": "qlora"}})


def test_init_adapter_is_a_reference_in_the_jobs_namespace():
    assert parse_spec({**BASE, "init_adapter": "team/sft@prod"}).init_adapter == "team/sft@prod"
    with pytest.raises(SpecError, match="init_adapter: must be an adapter of the job's"):
        parse_spec({**BASE, "init_adapter": "other/sft"})
    with pytest.raises(SpecError, match="init_adapter"):
        parse_spec({**BASE, "init_adapter": "../etc/passwd"})
