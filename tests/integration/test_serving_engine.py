"""The serving engine over a real catalog: exact mixed batches, aliases, corrupt adapters."""

from __future__ import annotations

import time

import pytest
import torch
from peft import PeftModel

from storage.objects import LocalObjectStore
from storage.registry import Registry
from storage.settings import load_settings
from workers.base_model import load_base
from workers.generate import greedy_generate
from workers.lora import LoraConfig, inject_lora, lora_modules, save_adapter
from workers.serving.engine import GenRequest, ServingEngine

PROMPTS = ["spell 1 2 =", "spell 7 =", "hello", "spell 3 3 ="]


def _publish(registry, tiny_base_dir, tmp_path, name, seed, r=4):  # type: ignore[no-untyped-def]
    model, _ = load_base(tiny_base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, alpha=2 * r, target_modules="all-linear")
    inject_lora(model, cfg)
    with torch.no_grad():
        for layer in lora_modules(model).values():
            layer.lora_B.weight.normal_(0, 0.2)
    out = save_adapter(model, cfg, tmp_path / f"{name}-{seed}")
    registry.publish(adapter_dir=out, ref=f"team/{name}", base_model="tiny")
    return out


@pytest.fixture()
def setup(tmp_path, tiny_base_dir):  # type: ignore[no-untyped-def]
    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(tmp_path / "home")}))
    registry.register_base(name="tiny", path=tiny_base_dir)
    dirs = {n: _publish(registry, tiny_base_dir, tmp_path, n, i) for i, n in enumerate("abc")}
    engine = ServingEngine(tiny_base_dir, registry, slots=2, max_rank=8, alias_ttl_s=0.0)
    yield registry, engine, dirs
    engine.close()  # its decode-loop thread holds the model


def _peft(tiny_base_dir, adapter_dir, prompt):  # type: ignore[no-untyped-def]
    base, tok = load_base(tiny_base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir) if adapter_dir else base
    return greedy_generate(model, tok, [prompt], max_new_tokens=8)[0]


def test_mixed_batch_equals_peft_per_adapter(setup, tiny_base_dir):
    _, engine, dirs = setup
    refs = ["team/a", "team/b", None, "team/a:1"]
    out = engine.complete(list(zip(PROMPTS, refs, strict=True)), max_new_tokens=8)
    for prompt, ref, c in zip(PROMPTS, refs, out, strict=True):
        assert c.error is None, c
        expected = _peft(tiny_base_dir, dirs[ref[5]] if ref else None, prompt)
        assert c.text == expected
    assert [c.adapter for c in out] == ["team/a:1", "team/b:1", None, "team/a:1"]
    # three adapters through two slots: the third evicts the least recently used
    more = engine.complete([(PROMPTS[0], "team/c"), (PROMPTS[1], "team/a")], max_new_tokens=4)
    assert all(c.error is None for c in more)
    assert engine.slots.stats.evictions >= 1


def test_alias_promotion_moves_traffic(setup, tiny_base_dir, tmp_path):
    registry, engine, _ = setup
    registry.promote("team/a:1", "production")
    assert engine.complete([(PROMPTS[0], "team/a@production")])[0].adapter == "team/a:1"
    _publish(registry, tiny_base_dir, tmp_path, "a", 9)
    registry.promote("team/a:2", "production")
    assert engine.complete([(PROMPTS[0], "team/a@production")])[0].adapter == "team/a:2"


def test_corrupt_and_unknown_adapters_fail_alone(setup):
    registry, engine, _ = setup
    v = registry.resolve("team/b")
    store = registry.store
    assert isinstance(store, LocalObjectStore)
    path = store.root / f"{v.object_prefix}/adapter_model.safetensors"
    path.chmod(0o644)
    data = path.read_bytes()
    path.write_bytes(data[:-4] + b"\0\0\0\0")
    registry.cache.remove(v)
    out = engine.generate(
        [GenRequest(PROMPTS[0], "team/b", 4), GenRequest(PROMPTS[1], "team/a", 4),
         GenRequest(PROMPTS[2], "team/nope", 4)]
    )  # fmt: skip
    assert out[0].kind == "corrupt" and "SHA-256 mismatch" in (out[0].error or "")
    assert out[1].error is None and out[1].text is not None
    assert out[2].kind == "not_found" and "team/nope" in (out[2].error or "")
    assert "team/b:1" not in engine.slots.resident()


def test_merged_mode_equals_unmerged_and_serves_only_its_adapter(setup, tiny_base_dir):
    registry, engine, _ = setup
    merged = ServingEngine(tiny_base_dir, registry, merged="team/a", alias_ttl_s=0.0)
    assert merged.layers == {}  # no per-token LoRA work at all
    reqs = [GenRequest(p, "team/a", 8) for p in PROMPTS]
    assert [r.text for r in merged.generate(reqs)] == [r.text for r in engine.generate(reqs)]
    assert merged.generate(reqs[:1])[0].adapter == "team/a:1"
    other = merged.generate([GenRequest(PROMPTS[0], "team/b", 4), GenRequest(PROMPTS[0], None)])
    assert [r.kind for r in other] == ["invalid", "invalid"]
    assert "only team/a:1" in (other[0].error or "")
    merged.close()


def test_more_distinct_adapters_than_slots_in_one_call(setup):
    _, engine, _ = setup  # 2 slots, 3 adapters + base: served in rounds, every answer right
    refs = ["team/a", "team/b", "team/c", None, "team/a"]
    together = engine.generate([GenRequest(PROMPTS[0], r, 6) for r in refs])
    alone = [engine.generate([GenRequest(PROMPTS[0], r, 6)])[0] for r in refs]
    assert [r.error for r in together] == [None] * len(refs)
    assert [r.text for r in together] == [r.text for r in alone]


def test_app_builder_takes_the_base_and_settings_from_the_environment(
    tmp_path, tiny_base_dir, monkeypatch
):
    from pydantic import ValidationError

    from workers.serving.app import AppArgs, options_from

    for key in ("LORAFLEET_CATALOG_URL", "LORAFLEET_OBJECT_STORE", "LORAFLEET_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "app-home"))
    from storage.registry import Registry
    from storage.settings import load_settings

    Registry.from_settings(load_settings()).register_base(name="tiny", path=tiny_base_dir)
    opts = options_from(AppArgs(base="tiny", slots=3))
    assert opts.base_name == "tiny" and opts.slots == 3
    assert str(tmp_path / "app-home") in opts.settings_json
    with pytest.raises(ValidationError, match="slotz"):
        AppArgs.model_validate({"base": "x", "slotz": 1})
    with pytest.raises(ValidationError, match="registered base"):  # a path means nothing here
        AppArgs.model_validate({"base": str(tiny_base_dir)})


def test_concurrent_stages_of_one_adapter_share_one_load(setup):
    import threading

    registry, engine, _ = setup
    version = registry.resolve("team/c")
    downloads = registry.cache.downloads
    barrier = threading.Barrier(8)
    staged = []

    def stage() -> None:
        barrier.wait()
        staged.append(engine.stage(version))

    threads = [threading.Thread(target=stage) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(a) for a in staged}) == 1  # one parsed copy in host memory
    assert registry.cache.downloads - downloads == len(version.files)  # each file once
    assert engine.stats()["host"]["misses"] == 1  # the other seven waited for that load


def test_a_deleted_version_leaves_every_tier(setup):
    """The sweep drops a version the catalog deleted from host memory and its slot; a request
    for it is then not found (the ingress refuses it first in the app)."""
    registry, engine, _ = setup
    version = registry.resolve("team/b")
    assert engine.generate([GenRequest(PROMPTS[0], version.ref, 4)])[0].error is None
    stats = engine.stats()
    assert version.ref in stats["host"]["resident"] and version.ref in stats["slots"]["resident"]
    assert engine.sweep_deleted() == []  # nothing deleted yet: nothing dropped
    registry.delete(version.ref)
    assert engine.sweep_deleted() == [version.ref]
    stats = engine.stats()
    assert version.ref not in stats["host"]["resident"]
    assert version.ref not in stats["slots"]["resident"]
    gone = engine.generate([GenRequest(PROMPTS[0], version.ref, 4)])[0]
    assert gone.kind == "not_found"


def test_a_full_queue_answers_overloaded_and_the_rest_are_served(tmp_path, tiny_base_dir):
    """Beyond ``max_queue`` waiting requests, submit answers ``overloaded`` at once (the HTTP
    layer's 429); those admitted are answered as usual."""
    import threading

    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(tmp_path / "home")}))
    engine = ServingEngine(tiny_base_dir, registry, slots=1, max_rank=8, alias_ttl_s=0.0,
                           max_rows=1, max_queue=1)  # fmt: skip
    step, held, release = engine.loop.decoder.step, threading.Event(), threading.Event()

    def gated(*args):  # type: ignore[no-untyped-def]
        held.set()
        assert release.wait(30)
        return step(*args)

    engine.loop.decoder.step = gated  # type: ignore[method-assign]
    results: list = []
    add = lambda rs: results.extend(rs)  # noqa: E731
    engine.submit(GenRequest(PROMPTS[0], None, 3), add)
    assert held.wait(30)  # running, its step held
    engine.submit(GenRequest(PROMPTS[1], None, 3), add)  # waits: max_rows=1
    engine.submit(GenRequest(PROMPTS[2], None, 3), add)  # no room in the queue
    assert [r.kind for r in results] == ["overloaded"]
    release.set()
    for _ in range(600):
        if len(results) == 3:
            break
        time.sleep(0.05)
    assert [r.error for r in results[1:]] == [None, None]
    engine.close()


def test_a_peft_dora_adapter_serves_in_mixed_batches_and_merged(setup, tiny_base_dir, tmp_path):
    """DoRA rows next to LoRA rows and base rows: each answers as PEFT does for it alone; the
    catalog records the method; merged mode folds the magnitude in."""
    from tests.peft_dora import peft_dora_adapter

    registry, engine, dirs = setup
    peft_dora_adapter(tiny_base_dir, tmp_path / "dora", ["q_proj", "v_proj", "down_proj"],
                      seed=11, scale=0.3)  # fmt: skip
    version = registry.publish(adapter_dir=tmp_path / "dora", ref="team/dora", base_model="tiny")
    assert version.method == "dora"
    refs = ["team/dora", "team/a", None, "team/dora"]
    out = engine.complete(list(zip(PROMPTS, refs, strict=True)), max_new_tokens=8)
    for prompt, ref, c in zip(PROMPTS, refs, out, strict=True):
        assert c.error is None, c
        adapter_dir = {"team/dora": tmp_path / "dora", "team/a": dirs["a"], None: None}[ref]
        assert c.text == _peft(tiny_base_dir, adapter_dir, prompt), (ref, prompt)
    merged = ServingEngine(tiny_base_dir, registry, slots=1, max_rank=8, merged="team/dora")
    try:
        c = merged.complete([(PROMPTS[0], "team/dora")], max_new_tokens=8)[0]
        assert c.error is None and c.text == _peft(tiny_base_dir, tmp_path / "dora", PROMPTS[0])
    finally:
        merged.close()


def test_an_adalora_adapter_is_served_as_its_kept_triplets(setup, tiny_base_dir, tmp_path):
    """A PEFT AdaLoRA adapter with pruned triplets: published as it is (method adalora), served
    as plain LoRA pairs of per-layer ranks next to other adapters, answers equal to PEFT's."""
    from peft import AdaLoraConfig, get_peft_model

    registry, engine, dirs = setup
    cfg = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                        total_step=40, tinit=5, tfinal=10, deltaT=5)  # fmt: skip
    peft_model = get_peft_model(load_base(tiny_base_dir)[0], cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_E" in name:
                p.copy_(torch.randn(p.shape, generator=g))
                p[: int(name.count("layers.0")) * 2 + 1] = 0  # layers pruned differently
            elif "lora_B" in name or "lora_A" in name:
                p.mul_(20)
    peft_model.save_pretrained(tmp_path / "ada")
    version = registry.publish(adapter_dir=tmp_path / "ada", ref="team/ada", base_model="tiny")
    assert version.method == "adalora" and version.r == 6
    refs = ["team/ada", "team/a", None, "team/ada"]
    out = engine.complete(list(zip(PROMPTS, refs, strict=True)), max_new_tokens=8)
    for prompt, ref, c in zip(PROMPTS, refs, out, strict=True):
        assert c.error is None, c
        adapter_dir = {"team/ada": tmp_path / "ada", "team/a": dirs["a"], None: None}[ref]
        assert c.text == _peft(tiny_base_dir, adapter_dir, prompt), (ref, prompt)


def _peft_logprobs(tiny_base_dir, adapter_dir, ids):  # type: ignore[no-untyped-def]
    """PEFT's log-softmax at every position of ``ids`` (float32)."""
    base, _ = load_base(tiny_base_dir)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_logprobs_and_echo_equal_peft_in_a_mixed_batch(setup, tiny_base_dir):
    """Sampled tokens' and prompt tokens' log-probabilities of an adapter, decoded next to
    other adapters and the base, equal PEFT's own forward within 2e-3."""
    _, engine, dirs = setup
    reqs = [GenRequest(PROMPTS[0], "team/a", 5, logprobs=5, echo=True),
            GenRequest(PROMPTS[1], "team/b", 5, logprobs=2, temperature=1.3, seed=4),
            GenRequest(PROMPTS[2], None, 5), GenRequest(PROMPTS[3], "team/a", 5)]  # fmt: skip
    out = engine.generate(reqs)
    assert [r.error for r in out] == [None] * 4
    for r, name in ((out[0], "a"), (out[1], "b")):
        full = _peft_logprobs(tiny_base_dir, dirs[name], r.prompt_ids + r.token_ids)
        start = len(r.prompt_ids) - 1
        assert r.logprobs is not None and len(r.logprobs) >= len(r.token_ids)
        for i, entry in enumerate(r.logprobs[: len(r.token_ids)]):
            assert entry.token == r.token_ids[i]
            assert abs(entry.logprob - float(full[start + i, entry.token])) < 2e-3
            best = [t for t, _ in entry.top]
            assert best == torch.topk(full[start + i], len(best)).indices.tolist()
    echo = out[0].prompt_logprobs
    assert echo is not None and echo[0] is None and len(echo) == len(out[0].prompt_ids)
    full = _peft_logprobs(tiny_base_dir, dirs["a"], out[0].prompt_ids)
    for p, entry in enumerate(echo[1:], start=1):
        assert entry is not None and entry.token == out[0].prompt_ids[p]
        assert abs(entry.logprob - float(full[p - 1, entry.token])) < 2e-3
    assert out[1].prompt_logprobs is None and out[2].logprobs is None


def test_n_seeded_choices_are_reproducible_whatever_the_batch(setup):
    _, engine, _ = setup
    req = GenRequest(PROMPTS[0], "team/a", 8, temperature=1.0, seed=7, n=4)
    alone = engine.generate([req])
    noise = [GenRequest(p, r, 12, temperature=0.8) for p in PROMPTS for r in ("team/b", None)]
    together = engine.generate([*noise, req])[-4:]
    assert [r.index for r in alone] == [0, 1, 2, 3]
    assert [r.text for r in alone] == [r.text for r in together]
    assert len({r.text for r in alone}) > 1  # each choice its own seed
    assert (
        alone[0].text
        == engine.generate([GenRequest(PROMPTS[0], "team/a", 8, temperature=1.0, seed=7)])[0].text
    )


def test_a_slot_whose_version_went_away_under_requests_is_freed_when_they_end(
    tmp_path, tiny_base_dir
):
    """Two slots, a request running on each, both versions dropped meanwhile (deleted or
    unloaded): when the requests end, both slots are free again and a third adapter is
    served — no slot is lost until a restart."""
    import threading

    registry = Registry.from_settings(load_settings({"LORAFLEET_HOME": str(tmp_path / "home")}))
    registry.register_base(name="tiny", path=tiny_base_dir)
    for i, n in enumerate("abc"):
        _publish(registry, tiny_base_dir, tmp_path, n, i)
    engine = ServingEngine(tiny_base_dir, registry, slots=2, max_rank=8, alias_ttl_s=0.0)
    decoder = engine.loop.decoder
    step, held, release = decoder.step, threading.Event(), threading.Event()

    def gated(*args):  # type: ignore[no-untyped-def]
        if len(decoder.live) == 2:  # both running: hold here
            held.set()
            assert release.wait(30)
        return step(*args)

    decoder.step = gated  # type: ignore[method-assign]
    done = threading.Semaphore(0)
    for name in "ab":
        engine.submit(GenRequest(PROMPTS[0], f"team/{name}", 12), lambda _: done.release())
    assert held.wait(30)
    assert sorted(engine.slots.resident()) == ["team/a:1", "team/b:1"]
    engine.forget("team/a:1")
    engine.forget("team/b:1")
    assert engine.slots.free() == 0  # still pinned by their running rows
    release.set()
    for _ in range(2):
        assert done.acquire(timeout=60)
    assert engine.slots.free() == 2
    third = engine.generate([GenRequest(PROMPTS[1], "team/c", 4)])[0]
    assert third.error is None and third.adapter == "team/c:1"
    engine.close()


def test_cached_prefixes_of_a_deleted_version_are_dropped(setup):
    registry, engine, _ = setup
    long = " ".join(PROMPTS * 6)
    for _ in range(2):
        assert engine.generate([GenRequest(long, "team/c", 3)])[0].error is None
    cache = engine.prefix_cache
    assert cache is not None and cache.owners().get("team/c:1", 0) > 0
    assert engine.stats()["prefix_cache"]["hits"] >= 1
    registry.delete("team/c:1")
    assert engine.sweep_deleted() == ["team/c:1"]
    for _ in range(200):  # the decode loop drops them between steps
        if "team/c:1" not in cache.owners():
            break
        time.sleep(0.01)
    assert "team/c:1" not in cache.owners()
