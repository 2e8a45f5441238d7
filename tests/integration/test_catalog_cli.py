"""``lorafleet db|base|adapters|gc`` end to end on an embedded home (SQLite + local store)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from workers.base_model import load_base
from workers.lora import LoraConfig, inject_lora, save_adapter

runner = CliRunner()


@pytest.fixture()
def home(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    for var in ("LORAFLEET_CATALOG_URL", "LORAFLEET_OBJECT_STORE", "LORAFLEET_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def _ok(*args):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def _fails(*args):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    return result.output


def test_catalog_commands(home, tiny_base_dir, tmp_path):
    model, _ = load_base(tiny_base_dir)
    cfg = LoraConfig(r=4)
    inject_lora(model, cfg)
    save_adapter(model, cfg, tmp_path / "ad")

    assert "catalog schema: empty → 0" in _ok("db", "upgrade")
    assert "up to date" in _ok("db", "status")
    assert "fingerprint" in _ok("base", "register", "tiny", tiny_base_dir)
    assert "team/x:1" in _ok(
        "adapters", "import", tmp_path / "ad", "--name", "team/x", "--base", "tiny", "--tag", "demo"
    )
    assert "team/x:2" in _ok(
        "adapters", "import", tmp_path / "ad", "--name", "team/x", "--base", "tiny"
    )
    listing = _ok("adapters", "list", "--tag", "demo")
    assert "team/x:1" in listing and "team/x:2" not in listing
    assert "@production → version 1" in _ok("adapters", "promote", "team/x:1", "production")
    shown = _ok("adapters", "show", "team/x@production")
    assert "team/x:1" in shown and "fingerprint" in shown and "production" in shown
    assert "digests verified" in _ok(
        "adapters", "download", "team/x@production", "--out", tmp_path / "dl"
    )
    assert (tmp_path / "dl" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "ad" / "adapter_model.safetensors"
    ).read_bytes()
    assert "deleted team/x:2" in _ok("adapters", "delete", "team/x:2")
    assert "removed 2 object(s)" in _ok("gc", "--min-age-s", "0")
    assert "0 version(s)" in _ok("adapters", "list", "--metric", "eval_loss<1")  # no metrics

    assert "invalid adapter reference" in _fails("adapters", "show", "../etc/passwd")
    assert "not registered" in _fails(
        "adapters", "import", tmp_path / "ad", "--name", "team/y", "--base", "nope"
    )
    assert "does not exist" in _fails("adapters", "show", "team/none")
    assert "invalid metric filter" in _fails("adapters", "list", "--metric", "loss<<1")


def test_behind_schema_is_reported(home, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLEET_CATALOG_URL", f"sqlite:///{tmp_path / 'shared.db'}")
    assert "lorafleet db upgrade" in _fails("adapters", "list")


def test_lists_print_the_apis_objects_for_scripts_and_never_cut_ids(home, tiny_base_dir, tmp_path):
    import json

    import yaml

    from orchestrator.objects import adapter_object, token_object
    from storage.catalog import repository as repo
    from storage.registry import Registry

    model, _ = load_base(tiny_base_dir)
    cfg = LoraConfig(r=4)
    inject_lora(model, cfg)
    save_adapter(model, cfg, tmp_path / "ad")
    _ok("base", "register", "tiny", tiny_base_dir)
    long = "accounting-department-invoices/" + "x" * 60  # longer than 80 columns with the rest
    _ok("adapters", "import", tmp_path / "ad", "--name", long, "--base", "tiny")
    registry = Registry.from_settings()
    expected = [adapter_object(v) for v in registry.list()]
    assert json.loads(_ok("adapters", "list", "-o", "json")) == json.loads(json.dumps(expected))
    assert yaml.safe_load(_ok("adapters", "list", "-o", "yaml"))[0]["id"] == f"{long}:1"
    assert json.loads(_ok("adapters", "show", f"{long}:1", "--output", "json"))["version"] == 1
    table = _ok("adapters", "list")  # piped (not a terminal): nothing cut
    assert f"{long}:1" in table and "…" not in table
    _ok("tokens", "create", "--namespace", "accounting-department-invoices", "--scope", "read")
    tokens = json.loads(_ok("tokens", "list", "-o", "json"))
    assert [t["scope"] for t in tokens] == ["read"] and "token" not in tokens[0]
    assert tokens == json.loads(json.dumps(
        [token_object(t) for t in repo.list_tokens(registry.catalog)]))  # fmt: skip
    assert json.loads(_ok("jobs", "list", "-o", "json")) == []
    assert json.loads(_ok("files", "list", "-o", "json")) == []
    assert "invalid value" in _fails("adapters", "list", "-o", "xml").lower()


def test_gate_promote_force_rollback_usage_and_idle_commands(home, tiny_base_dir, tmp_path):
    import json

    from storage.catalog import usage
    from storage.catalog.models import AdapterVersionRow, utcnow
    from storage.registry import Registry

    model, _ = load_base(tiny_base_dir)
    inject_lora(model, LoraConfig(r=4))
    save_adapter(model, LoraConfig(r=4), tmp_path / "ad")
    _ok("base", "register", "tiny", tiny_base_dir)
    for _ in range(2):
        _ok("adapters", "import", tmp_path / "ad", "--name", "team/x", "--base", "tiny")
    registry = Registry.from_settings()
    with registry.catalog.session() as s:
        for row in s.query(AdapterVersionRow):
            row.metrics = {"eval_loss": 0.8 if row.version == 2 else 0.3}

    assert "give --require rules, or --clear" in _fails("adapters", "gate", "team/x", "production")
    assert "invalid gate rule" in _fails("adapters", "gate", "team/x", "production",
                                         "--require", "eval_loss")  # fmt: skip
    out = _ok("adapters", "gate", "team/x", "production", "--require", "eval_loss <= 0.5",
              "--require", "eval_loss<=current+2%")  # fmt: skip
    assert "eval_loss<=0.5 and eval_loss<=current+2%" in out
    assert "version 1" in _ok("adapters", "promote", "team/x:1", "production")
    refused = " ".join(_fails("adapters", "promote", "team/x:2", "production").split())
    assert "team/x:2 has eval_loss 0.8 > 0.5" in refused and "--force" in refused
    assert "version 2" in _ok("adapters", "promote", "team/x:2", "production", "--force")
    assert "gate @production" in _ok("adapters", "show", "team/x:2")
    assert "version 1" in _ok("adapters", "rollback", "team/x", "production")
    assert "name the adapter" in _fails("adapters", "rollback", "team/x:1", "production")
    assert "none (cleared)" in _ok("adapters", "gate", "team/x", "production", "--clear")

    now = usage.minute_of(utcnow())
    usage.add_usage(registry.catalog, [usage.UsageCount(now, "team", "team/x:1", 2, 20, 6)])
    rows = json.loads(_ok("usage", "--adapter", "team/x", "-o", "json"))
    assert [(u["model"], u["requests"], u["total_tokens"]) for u in rows] == [("team/x:1", 2, 26)]
    assert "2 request(s), 26 tokens" in _ok("usage", "--since", "1h")
    assert "--since" in _fails("usage", "--since", "soon")
    assert "0 version(s) with no traffic" in _ok("adapters", "list", "--idle", "30d")
    from datetime import timedelta

    with registry.catalog.session() as s:  # both versions two days old; only 1 served today
        for row in s.query(AdapterVersionRow):
            row.created_at = utcnow() - timedelta(days=2)
    idle = json.loads(_ok("adapters", "list", "--idle", "1d", "-o", "json"))
    assert [(v["id"], v["last_used_at"]) for v in idle] == [("team/x:2", None)]
    assert "--idle" in _fails("adapters", "list", "--idle", "a while")


def test_an_adapter_with_a_nan_weight_is_refused_naming_the_tensor(home, tiny_base_dir, tmp_path):
    """``adapters import`` died with a traceback from the spectrum's SVD; now the import (and
    every publish path, since they share the check) refuses it in one line naming the tensor,
    and the catalog keeps nothing. bfloat16 files are checked as exactly as float32 ones."""
    import torch
    from safetensors.torch import load_file, save_file

    from storage.adapter_files import inspect_adapter_dir
    from storage.errors import AdapterRejected

    model, _ = load_base(tiny_base_dir)
    cfg = LoraConfig(r=4)
    inject_lora(model, cfg)
    bad = save_adapter(model, cfg, tmp_path / "bad")
    weights = load_file(str(bad / "adapter_model.safetensors"))
    name = sorted(k for k in weights if "lora_A" in k)[1]
    weights[name][0, 0] = float("nan")
    save_file(weights, str(bad / "adapter_model.safetensors"))
    _ok("base", "register", "tiny", tiny_base_dir)
    out = _fails("adapters", "import", bad, "--name", "team/bad", "--base", "tiny")
    assert name in out and "NaN" in out
    assert "0 version(s)" in _ok("adapters", "list")
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()},
              str(bad / "adapter_model.safetensors"))  # fmt: skip
    with pytest.raises(AdapterRejected, match=name.replace(".", r"\.")):
        inspect_adapter_dir(bad)
    weights[name][0, 0] = float("-inf")
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterRejected, match="NaN or infinite"):
        inspect_adapter_dir(bad)
    weights[name][0, 0] = 1.0
    save_file(weights, str(bad / "adapter_model.safetensors"))
    inspect_adapter_dir(bad)  # finite again: accepted
