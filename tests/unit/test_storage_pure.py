"""Pure storage logic: names, references, fingerprints, adapter checks, settings, filters."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from storage.adapter_files import check_against_base, inspect_adapter_dir
from storage.errors import AdapterRejected, InvalidName, InvalidReference
from storage.fingerprint import fingerprint_model_dir, tensor_index
from storage.metric_filter import MetricFilterError, parse_metric_filter
from storage.names import AdapterRef, parse_ref, validate_name
from storage.settings import SettingsError, load_settings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("team/adapter", AdapterRef("team", "adapter")),
        ("team/adapter:3", AdapterRef("team", "adapter", version=3)),
        ("team/adapter@production", AdapterRef("team", "adapter", alias="production")),
        ("a.b/c_d-e", AdapterRef("a.b", "c_d-e")),
    ],
)
def test_parse_ref(text, expected):
    assert parse_ref(text) == expected
    assert str(parse_ref(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "team",
        "team/",
        "/team/x",
        "team/x/y",
        "../x",
        "team/..",
        "team/.x",
        "Team/x",
        "team/x:0",
        "team/x:v1",
        "team/x@",
        "team/x:1@a",
        "team/" + "x" * 65,
        "team/x y",
        "",
        "team/x:²",  # str.isdigit() says yes; int() says no
        "team/x:١",  # Arabic-Indic one: int() would read it as 1
        f"team/x:{2**63}",  # beyond a 64-bit version column
    ],
)
def test_bad_refs(text):
    with pytest.raises(InvalidReference):
        parse_ref(text)


def test_settings_never_show_the_catalog_password_or_the_token():
    from storage.settings import mask_url

    url = "postgresql+psycopg://lf:hunter2@db:5432/lf"
    s = load_settings({"LORAFLEET_HOME": "/tmp/lf-x", "LORAFLEET_API_TOKEN": "tok-123",
                       "LORAFLEET_CATALOG_URL": url})  # fmt: skip
    for shown in (repr(s), str(s), f"{s}"):
        assert "hunter2" not in shown and "tok-123" not in shown
        assert "lf:***@db:5432" in shown
    assert s.catalog_url.endswith("lf:hunter2@db:5432/lf")  # the value itself is intact
    assert mask_url("sqlite:////tmp/a@b/catalog.db") == "sqlite:////tmp/a@b/catalog.db"
    assert mask_url("postgresql://lf@db/lf") == "postgresql://lf@db/lf"  # no password
    assert mask_url("postgresql://lf:p@ss@db/lf") == "postgresql://lf:***@db/lf"


def test_settings_cross_nodes_without_their_secrets(tmp_path):
    from storage.settings import settings_for_nodes, settings_on_node

    url = "postgresql+psycopg://lf:hunter2@db:5432/lf"
    head = load_settings({"LORAFLEET_HOME": str(tmp_path / "head"), "LORAFLEET_API_TOKEN":
                          "tok-123", "LORAFLEET_CATALOG_URL": url})  # fmt: skip
    sent = settings_for_nodes(head)
    assert "hunter2" not in sent and "tok-123" not in sent and "lf:***@db:5432" in sent
    # the receiving node completes the secrets (and the home) from its own configuration
    node_env = {"LORAFLEET_HOME": str(tmp_path / "node"), "LORAFLEET_API_TOKEN": "tok-123",
                "LORAFLEET_CATALOG_URL": url}  # fmt: skip
    got = settings_on_node(sent, node_env)
    assert got.catalog_url == url and got.home == tmp_path / "node"
    assert got.api_token is not None and got.api_token.get_secret_value() == "tok-123"
    assert got.object_store == head.object_store  # the shared parts travel as sent
    # a node without the password says what to configure
    with pytest.raises(SettingsError, match="LORAFLEET_CATALOG_URL"):
        settings_on_node(sent, {"LORAFLEET_HOME": str(tmp_path / "node")})
    # a secret sent in clear is refused, so a call site that forgets is caught by any test
    assert "hunter2" not in head.model_dump_json() and "tok-123" not in head.model_dump_json()
    clear = {**json.loads(sent), "catalog_url": url}
    with pytest.raises(SettingsError, match="in clear"):
        settings_on_node(json.dumps(clear), node_env)
    with pytest.raises(SettingsError, match="API token"):
        settings_on_node(head.model_dump_json(), node_env)  # SecretStr dumps masked; still refused
    # without a password nothing needs completing
    plain = load_settings({"LORAFLEET_HOME": str(tmp_path / "head")})
    assert settings_on_node(settings_for_nodes(plain), node_env).catalog_url == plain.catalog_url


def test_the_largest_version_parses():
    assert parse_ref(f"team/x:{2**63 - 1}").version == 2**63 - 1


@pytest.mark.parametrize("token", ["tök", "se\u2028cret", "", "a\x00b"])
def test_malformed_bearer_tokens_are_unauthorized_not_errors(token):
    from storage.auth import Unauthorized, authenticate

    # no catalog is touched: a malformed token is refused before any lookup
    with pytest.raises(Unauthorized):
        authenticate(None, "admin-secret", f"Bearer {token}")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["..", ".", "a/b", "-x", "", "A", "a" * 65, "x\0"])
def test_bad_names(name):
    with pytest.raises(InvalidName):
        validate_name(name)


def test_fingerprint_tracks_weights_not_paths(tiny_base_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_base_dir, copy)
    a, b = fingerprint_model_dir(tiny_base_dir), fingerprint_model_dir(copy)
    assert a.sha256 == b.sha256 and a.architecture == "LlamaForCausalLM"
    assert a.parameter_count == 656_000
    from workers.tiny_base import TinySpec, create_tiny_base

    other = create_tiny_base(tmp_path / "other", TinySpec(seed=1))  # same shapes, other weights
    assert fingerprint_model_dir(other).sha256 != a.sha256
    full = fingerprint_model_dir(tiny_base_dir, full=True)
    assert full.sha256 == fingerprint_model_dir(copy, full=True).sha256


def _adapter(tmp_path, tensors, config=None):  # type: ignore[no-untyped-def]
    d = tmp_path / "ad"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(
        json.dumps(
            config or {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
        )
    )
    save_file(tensors, d / "adapter_model.safetensors")
    return d


def test_adapter_checks_against_base_headers(tiny_base_dir, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    good = _adapter(
        tmp_path,
        {f"{key}.lora_A.weight": torch.zeros(2, 128), f"{key}.lora_B.weight": torch.zeros(128, 2)},
    )
    manifest = inspect_adapter_dir(good)
    assert manifest.r == 2 and list(manifest.modules()) == ["model.layers.0.self_attn.q_proj"]
    check_against_base(manifest, tensor_index(tiny_base_dir))
    save_file({f"{key}.lora_A.weight": torch.zeros(2, 128)}, good / "adapter_model.safetensors")
    with pytest.raises(AdapterRejected, match="lacks lora_A or lora_B"):
        inspect_adapter_dir(good)
    save_file({"model.embed_tokens.weight": torch.zeros(2, 2)}, good / "adapter_model.safetensors")
    with pytest.raises(AdapterRejected, match="unexpected tensor"):
        inspect_adapter_dir(good)
    (good / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterRejected, match="not valid JSON"):
        inspect_adapter_dir(good)


def test_settings_env_over_toml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lorafleet.toml").write_text(
        'object_store = "s3://bucket/pfx"\ncache_max_bytes = 1000\n'
    )
    s = load_settings({"LORAFLEET_HOME": str(tmp_path / "h")})
    assert s.object_store == "s3://bucket/pfx" and s.cache_max_bytes == 1000
    assert s.catalog_url == f"sqlite:///{tmp_path / 'h' / 'catalog.db'}" and s.embedded_catalog
    s = load_settings(
        {
            "LORAFLEET_HOME": str(tmp_path / "h"),
            "LORAFLEET_OBJECT_STORE": "file:///x",
            "LORAFLEET_API_TOKEN": "secret",
        }
    )
    assert s.object_store == "file:///x" and "secret" not in repr(s)
    (tmp_path / "lorafleet.toml").write_text('object_stor = "typo"\n')
    with pytest.raises(SettingsError, match="object_stor"):
        load_settings({"LORAFLEET_HOME": str(tmp_path / "h")})


def test_metric_filters():
    f = parse_metric_filter("eval_loss<0.5")
    assert f.matches({"eval_loss": 0.4}) and not f.matches({"eval_loss": 0.6})
    assert not f.matches({}) and not f.matches({"eval_loss": "low"})
    assert parse_metric_filter("acc >= 0.9").matches({"acc": 0.9})
    with pytest.raises(MetricFilterError):
        parse_metric_filter("acc=>1")


def test_a_plain_postgresql_url_keeps_its_password_for_the_driver():
    from storage.catalog.db import make_engine

    engine = make_engine("postgresql://lf:hunter2@db:5432/lf")  # no connection is made
    assert engine.url.drivername == "postgresql+psycopg" and engine.url.password == "hunter2"
    engine.dispose()
