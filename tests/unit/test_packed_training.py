"""Packed training equals solo training: 3 different jobs trained in one batched forward have
the solo per-step losses and the solo adapters (fp32, ≤ 1e-4), and jobs leaving or joining
the pack change nobody else's curve."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.base_model import load_base
from workers.datasets import load_dataset
from workers.demo_task import TRAIN_FILE
from workers.errors import TrainingError
from workers.lora import LoraConfig, inject_lora
from workers.lora.inject import lora_state_dict
from workers.lora.io import read_adapter_weights
from workers.training.packed import PackedRecipe
from workers.training.recipe import LoraFinetuneRecipe, TrainConfig

STEPS = 20
TOL = 1e-4
# three jobs that differ in everything a job may choose: rank, alpha, targets, seed, lr, rows
JOBS = {
    "a": (LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
          TrainConfig(max_steps=STEPS, batch_size=4, seq_len=48, seed=1, lr=3e-3, warmup_steps=2)),
    "b": (LoraConfig(r=4, alpha=4, target_modules="all-linear", use_rslora=True),
          TrainConfig(max_steps=STEPS, batch_size=3, seq_len=32, seed=2, lr=1e-3, warmup_steps=0)),
    "c": (LoraConfig(r=16, alpha=8, target_modules=("k_proj", "o_proj", "down_proj")),
          TrainConfig(max_steps=STEPS, batch_size=5, seq_len=64, seed=3, lr=5e-3, warmup_steps=4,
                      max_grad_norm=0.5)),
}  # fmt: skip


def _data(tokenizer, cfg: TrainConfig):  # type: ignore[no-untyped-def]
    return load_dataset(TRAIN_FILE, tokenizer, seq_len=cfg.seq_len)


def _solo(tiny_base_dir: Path, key: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    model, tok = load_base(tiny_base_dir)
    lora, cfg = JOBS[key]
    recipe = LoraFinetuneRecipe(model, lora, cfg, pad_id=tok.pad_token_id)
    recipe.setup()
    examples = _data(tok, cfg)
    losses = [recipe.train_step(examples).loss for _ in range(STEPS)]
    return losses, {k: v.clone() for k, v in lora_state_dict(model).items()}


@pytest.fixture(scope="module")
def solo(tiny_base_dir: Path) -> dict[str, tuple[list[float], dict[str, torch.Tensor]]]:
    return {key: _solo(tiny_base_dir, key) for key in JOBS}


def _pack(tiny_base_dir: Path) -> tuple[PackedRecipe, object]:
    model, tok = load_base(tiny_base_dir)
    return PackedRecipe(model, pad_id=tok.pad_token_id), tok


def _close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    worst = max(abs(g - w) for g, w in zip(got, want, strict=True))
    assert worst <= TOL, f"per-step loss differs by {worst:.2e}"


def test_three_packed_jobs_have_their_solo_curves_and_adapters(tiny_base_dir, solo, tmp_path):
    pack, tok = _pack(tiny_base_dir)
    for key, (lora, cfg) in JOBS.items():
        pack.add(key, lora, cfg, _data(tok, cfg))
    curves: dict[str, list[float]] = {k: [] for k in JOBS}
    pack.run(on_report=lambda key, r: curves[key].append(r.loss))
    for key in JOBS:
        _close(curves[key], solo[key][0])
        out = pack.save(key, tmp_path / key)
        saved = read_adapter_weights(out)
        assert set(saved) == set(solo[key][1])  # the same PEFT keys: its own targets only
        for name, want in solo[key][1].items():
            assert torch.allclose(saved[name], want, atol=TOL, rtol=0), name
    # the base was shared, never copied, and is untouched
    fresh, _ = load_base(tiny_base_dir)
    base = {n: p for n, p in pack.model.named_parameters()}
    for name, p in fresh.named_parameters():
        wrapped = name.replace(".weight", ".base_layer.weight")
        assert torch.equal(base.get(name, base.get(wrapped)), p), name  # type: ignore[arg-type]


def test_a_job_leaving_or_joining_changes_no_other_curve(tiny_base_dir, solo):
    pack, tok = _pack(tiny_base_dir)
    for key in ("a", "b"):
        pack.add(key, *JOBS[key], _data(tok, JOBS[key][1]))
    curves: dict[str, list[float]] = {k: [] for k in JOBS}
    for step in range(STEPS):
        if step == 5:  # a late joiner, at a step boundary
            pack.add("c", *JOBS["c"], _data(tok, JOBS["c"][1]))
        if step == 10:  # cancelled mid-run
            pack.remove("b")
        for key, report in pack.step().items():
            curves[key].append(report.loss)
    while not pack.jobs["c"].done:  # c started late: it runs to its own end
        curves["c"].append(pack.step()["c"].loss)
    _close(curves["a"], solo["a"][0])
    _close(curves["b"], solo["b"][0][:10])
    _close(curves["c"], solo["c"][0])


def test_the_pack_refuses_what_it_cannot_share(tiny_base_dir):
    pack, tok = _pack(tiny_base_dir)
    lora, cfg = JOBS["a"]
    pack.add("a", lora, cfg, _data(tok, cfg))
    with pytest.raises(TrainingError, match="already in the pack"):
        pack.add("a", lora, cfg, _data(tok, cfg))
    other = TrainConfig(max_steps=5, batch_size=4, seq_len=48, grad_accum=2)
    with pytest.raises(TrainingError, match="grad_accum"):
        pack.add("x", lora, other, _data(tok, other))


def test_packed_layers_keep_peft_module_paths(tiny_base_dir):
    """A model with packed layers still resolves target names (a late joiner's targets)."""
    model, _ = load_base(tiny_base_dir)
    plain, _ = load_base(tiny_base_dir)
    pack = PackedRecipe(model, pad_id=0)
    lora, cfg = JOBS["a"]
    examples = [e for e in _data(load_base(tiny_base_dir)[1], cfg)]
    pack.add("a", lora, cfg, examples)
    paths = set(pack.jobs["a"].modules)
    assert paths == set(inject_lora(plain, lora))


class _ThreadAllReduce:
    """``world`` ranks as threads: each call sums every rank's tensors in place."""

    def __init__(self, world: int) -> None:
        import threading

        self.world = world
        self.barrier = threading.Barrier(world)
        self.lock = threading.Lock()
        self.parts: list[list[torch.Tensor]] = []
        self.calls = 0

    def __call__(self, tensors: list[torch.Tensor]) -> None:
        with self.lock:
            self.parts.append(tensors)
        self.barrier.wait()
        if self.barrier.wait() == 0:  # one rank sums, after every rank has arrived
            sums = [torch.stack([p[i] for p in self.parts]).sum(0) for i in range(len(tensors))]
            for p in self.parts:
                for t, s in zip(p, sums, strict=True):
                    t.copy_(s)
            self.parts = []
            self.calls += 1
        self.barrier.wait()


def test_a_data_parallel_pack_reduces_once_per_step_and_equals_one_process(tiny_base_dir):
    """Two ranks × (jobs a, c) give the one-process pack's losses, with one all-reduce of every
    job's gradients per step."""
    import threading

    steps, world = 6, 2

    def jobs(per_rank: int) -> list[tuple[str, LoraConfig, TrainConfig]]:
        return [(k, JOBS[k][0], TrainConfig(max_steps=steps, batch_size=per_rank, seq_len=48,
                                            seed=i, warmup_steps=0))
                for i, k in enumerate(("a", "c"))]  # fmt: skip

    def join(pack: PackedRecipe, tok, specs) -> PackedRecipe:  # type: ignore[no-untyped-def]
        # in this thread: adding seeds the global RNG, which the rank threads would share
        for key, lora, cfg in specs:
            pack.add(key, lora, cfg, _data(tok, cfg))
        return pack

    def run(rank: int, pack: PackedRecipe, out) -> None:  # type: ignore[no-untyped-def]
        out[rank] = [pack.step() for _ in range(steps)]

    single, tok = _pack(tiny_base_dir)
    alone: dict[int, list] = {}
    run(0, join(single, tok, jobs(4)), alone)
    reducer = _ThreadAllReduce(world)
    ranks: dict[int, list] = {}
    threads = []
    for rank in range(world):
        model, tok = load_base(tiny_base_dir)
        pack = PackedRecipe(model, pad_id=tok.pad_token_id, world=world, rank=rank,
                            all_reduce=reducer)  # fmt: skip
        join(pack, tok, jobs(2))
        threads.append(threading.Thread(target=run, args=(rank, pack, ranks)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert reducer.calls == steps  # every job's gradients in one all-reduce per step
    for key in ("a", "c"):
        want = [r[key].loss for r in alone[0]]
        for rank in range(world):
            _close([r[key].loss for r in ranks[rank]], want)


def test_a_packed_checkpoint_resumes_alone_and_a_lone_one_in_a_pack(tiny_base_dir, solo, tmp_path):
    """One checkpoint format: job b checkpointed at step 8 inside a pack goes on alone (and
    job a's lone checkpoint goes on in a pack), each ending on its uninterrupted curve."""
    from workers.lora.inject import lora_modules
    from workers.training.checkpoint import read_checkpoint, write_checkpoint

    pack, tok = _pack(tiny_base_dir)
    for key in ("a", "b"):
        pack.add(key, *JOBS[key], _data(tok, JOBS[key][1]))
    for _ in range(8):
        pack.step()
    job = pack.jobs["b"]
    assert job.optimizer is not None
    write_checkpoint(tmp_path, job.modules, job.optimizer, job.step)
    model, _ = load_base(tiny_base_dir)
    alone = LoraFinetuneRecipe(model, *JOBS["b"], pad_id=tok.pad_token_id)
    alone.setup()
    assert alone.optimizer is not None
    alone.step = read_checkpoint(tmp_path, lora_modules(model), alone.optimizer)
    examples = _data(tok, JOBS["b"][1])
    _close([alone.train_step(examples).loss for _ in range(8, STEPS)], solo["b"][0][8:])

    model, _ = load_base(tiny_base_dir)
    lone = LoraFinetuneRecipe(model, *JOBS["a"], pad_id=tok.pad_token_id)
    lone.setup()
    examples = _data(tok, JOBS["a"][1])
    for _ in range(5):
        lone.train_step(examples)
    assert lone.optimizer is not None
    write_checkpoint(tmp_path, lora_modules(model), lone.optimizer, lone.step)
    pack, _ = _pack(tiny_base_dir)
    joined = pack.add("a", *JOBS["a"], examples)
    assert joined.optimizer is not None
    joined.step = read_checkpoint(tmp_path, joined.modules, joined.optimizer)
    curve = []
    pack.run(on_report=lambda _, r: curve.append(r.loss))
    _close(curve, solo["a"][0][5:])


def test_a_job_whose_loss_is_not_finite_fails_alone(tiny_base_dir, solo):
    pack, tok = _pack(tiny_base_dir)
    for key in ("a", "b"):
        pack.add(key, *JOBS[key], _data(tok, JOBS[key][1]))
    with torch.no_grad():  # b's adapter blows up; a's does not see it
        for m in pack.jobs["b"].modules.values():
            m.lora_B.weight.fill_(float("inf"))
    failed: dict[str, str] = {}
    reports = pack.step(failed)
    assert set(failed) == {"b"} and "not finite" in failed["b"] and set(reports) == {"a"}
    pack.remove("b")
    curve = [reports["a"].loss]
    pack.run(on_report=lambda _, r: curve.append(r.loss))
    _close(curve, solo["a"][0])
    with pytest.raises(TrainingError, match="not finite"):
        bad, _ = _pack(tiny_base_dir)
        bad.add("b", *JOBS["b"], _data(tok, JOBS["b"][1]))
        for m in bad.jobs["b"].modules.values():
            with torch.no_grad():
                m.lora_B.weight.fill_(float("inf"))
        bad.step()
