"""Interactive training sessions on one resident base: the training core, one call at a time.

A Tinker-style client drives training itself — ``forward_backward`` on datums it built,
``optim_step`` with the optimizer settings it chooses, ``sample`` from a saved snapshot. Each
training client is a ``Member`` of one ``PackedRecipe`` on the resident base, so several
sessions' ``forward_backward`` calls run as one shared base forward (``Trainer.accumulate``)
and each step is the core's own ``Trainer.optimizer_step``. A sampler is a frozen snapshot of a
member's adapter, packed beside the members (a few MB), decoded by the serving engine's
decoder (``Trainer.sample``). Nothing here knows HTTP, protobuf or the catalog: the
``orchestrator.tinker`` door translates the protocol and owns the sessions' records.

Not thread-safe: one thread (the door's worker) calls everything.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.errors import TrainingError
from workers.lora import LoraConfig
from workers.lora.io import save_adapter_state
from workers.lora.layer import LoraLinear
from workers.serving.decode import DecodeRow, RowOutput
from workers.training.checkpoint import adapter_state, read_checkpoint, write_checkpoint
from workers.training.core import Member
from workers.training.objectives import TOKEN_LOSS_INPUTS, TokenDatum, TokenLoss
from workers.training.packed import PackedRecipe
from workers.training.settings import TrainConfig

log = logging.getLogger(__name__)

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
SESSION_ALPHA = 32.0  # Tinker's LoRA alpha: its recommended learning rates assume it
NEVER = 1 << 62  # a session member's max_steps: it ends when its session does


@dataclass(frozen=True)
class Adam:
    """One optimizer step's settings (Tinker's ``AdamParams``)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0


@dataclass(frozen=True)
class LossCall:
    """One ``forward_backward`` (or forward) of one member."""

    key: str
    datums: Sequence[TokenDatum]
    loss_fn: str = "cross_entropy"
    clip_low: float = 0.8
    clip_high: float = 1.2
    forward_only: bool = False


@dataclass(frozen=True)
class LossResult:
    """Per datum its targets' log-probabilities, and the loss summed over the call."""

    logprobs: list[list[float]]
    loss_sum: float
    tokens: int


@dataclass
class Snapshot:
    """A frozen copy of a member's adapter that samplers decode with."""

    key: str
    modules: dict[str, LoraLinear]
    lora: LoraConfig
    last_used: float = field(default_factory=time.monotonic)


def session_lora(rank: int, *, train_attn: bool = True, train_mlp: bool = True) -> LoraConfig:
    """The adapter a Tinker training client asks for (the output head is never adapted:
    serving and the frozen-head loss keep it shared)."""
    if rank < 1 or rank > 256:
        raise TrainingError(f"lora rank {rank}: between 1 and 256")
    targets = (ATTN_MODULES if train_attn else ()) + (MLP_MODULES if train_mlp else ())
    if not targets:
        raise TrainingError("train_attn and train_mlp are both false: nothing to train")
    return LoraConfig(r=rank, alpha=SESSION_ALPHA, target_modules=targets)


def check_datums(datums: Sequence[TokenDatum], loss_fn: str, vocab: int) -> None:
    """A call's datums are well formed for ``loss_fn``.

    Raises:
        TrainingError: an unknown loss, an empty batch or datum, lengths that disagree,
            a missing input, or a token outside the vocabulary (naming the datum).
    """
    needs = TOKEN_LOSS_INPUTS.get(loss_fn)
    if needs is None:
        known = ", ".join(TOKEN_LOSS_INPUTS)
        raise TrainingError(f"unknown loss_fn {loss_fn!r}; this server has {known}")
    if not datums:
        raise TrainingError("forward_backward needs at least one datum")
    for i, d in enumerate(datums):
        n = len(d.tokens)
        if n == 0:
            raise TrainingError(f"datum {i}: model_input is empty")
        if len(d.targets) != n:
            raise TrainingError(f"datum {i}: target_tokens has {len(d.targets)} entries for "
                                f"{n} input tokens")  # fmt: skip
        for name in needs:
            values = d.inputs.get(name)
            if values is None:
                raise TrainingError(f"datum {i}: loss_fn {loss_fn} needs {name!r}")
            if len(values) != n:
                raise TrainingError(f"datum {i}: {name} has {len(values)} entries for {n} "
                                    "input tokens")  # fmt: skip
            if not all(math.isfinite(v) for v in values):
                raise TrainingError(f"datum {i}: {name} holds a value that is not finite")
        bad = next((t for t in (*d.tokens, *d.targets) if not 0 <= t < vocab), None)
        if bad is not None:
            raise TrainingError(f"datum {i}: token id {bad} is outside the vocabulary "
                                f"(0..{vocab - 1})")  # fmt: skip


class SessionHost:
    """Every training client and sampler on one resident base.

    Args:
        model: the base causal LM (frozen; the members' layers are packed into it).
        tokenizer: its tokenizer (sampling decodes with it).
        device: where the base lives; an idle member's state may leave it (``park``).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, device: str = "cpu") -> None:
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        self.device = torch.device(device)
        self.recipe = PackedRecipe(model, pad_id=self.pad_id, device=self.device,
                                   tokenizer=tokenizer)  # fmt: skip
        self.trainer = self.recipe.trainer
        embeddings: Any = model.get_input_embeddings()  # type: ignore[operator]
        self.vocab = int(embeddings.weight.shape[0])
        self.snapshots: dict[str, Snapshot] = {}
        self.parked: set[str] = set()

    # -- members -----------------------------------------------------------------------------
    def create(self, key: str, lora: LoraConfig, *, seed: int = 0) -> Member:
        """A fresh member: its layers seeded as a solo run's, AdamW over them."""
        if key in self.trainer.members:
            raise TrainingError(f"model {key} exists")
        modules, params = self.recipe.attach(key, lora, seed=seed)
        d = Adam()
        optimizer = torch.optim.AdamW(params, lr=d.learning_rate, betas=(d.beta1, d.beta2),
                                      eps=d.eps, weight_decay=d.weight_decay)  # fmt: skip
        cfg = TrainConfig(max_steps=NEVER, seed=seed, lr=d.learning_rate)
        member = Member(key, cfg, TokenLoss("cross_entropy", self.pad_id), (), modules, params,
                        optimizer, lora=lora)  # fmt: skip
        return self.trainer.add(member)

    def member(self, key: str) -> Member:
        m = self.trainer.members.get(key)
        if m is None:
            raise TrainingError(f"model {key} is not loaded")
        if key in self.parked:
            self._move(m, self.device)
            self.parked.discard(key)
        return m

    def drop(self, key: str) -> None:
        """A member leaves (its session ended); the others go on unchanged."""
        if key in self.trainer.members:
            self.trainer.remove(key)
        self.parked.discard(key)

    # -- training ----------------------------------------------------------------------------
    def forward_backward(self, calls: Sequence[LossCall]) -> dict[str, LossResult]:
        """Every call's forward — one shared base forward for the calls that train, one for
        those that only score — adding gradients of each training call's loss *sum*."""
        for c in calls:
            check_datums(c.datums, c.loss_fn, self.vocab)
        out: dict[str, LossResult] = {}
        for backward in (True, False):
            group = [c for c in calls if c.forward_only is not backward]
            if not group:
                continue
            batches = []
            for c in group:
                m = self.member(c.key)
                m.objective = TokenLoss(c.loss_fn, self.pad_id, c.clip_low, c.clip_high)
                batches.append((m, list(c.datums)))
            self.trainer.model.train(backward)
            try:
                done = self.trainer.accumulate(batches, {c.key: 1.0 for c in group},
                                               backward=backward)  # fmt: skip
            finally:
                self.trainer.model.eval()
            for c in group:
                loss_sum, lp = done[c.key]
                per_datum = [lp.values[lp.rows == i].tolist() for i in range(len(c.datums))]
                out[c.key] = LossResult(per_datum, float(loss_sum),
                                        sum(len(d.tokens) for d in c.datums))  # fmt: skip
        return out

    def optim_step(self, key: str, adam: Adam) -> dict[str, float]:
        """One AdamW step of ``key`` with the accumulated gradients, which are then cleared."""
        m = self.member(key)
        for group in m.optimizer.param_groups:
            group.update(lr=adam.learning_rate, betas=(adam.beta1, adam.beta2), eps=adam.eps,
                         weight_decay=adam.weight_decay)  # fmt: skip
        norm = self.trainer.optimizer_step(m, adam.grad_clip_norm)
        m.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm:mean": norm, "learning_rate:mean": adam.learning_rate}

    # -- state -------------------------------------------------------------------------------
    def save_state(self, key: str, directory: Path) -> None:
        """The member's adapter, optimizer state and step, in the checkpoint format."""
        m = self.member(key)
        write_checkpoint(directory, m.modules, m.optimizer, m.step)

    def load_state(self, key: str, directory: Path, *, optimizer: bool) -> None:
        """Restore a saved state into member ``key`` (its optimizer too when asked)."""
        m = self.member(key)
        saved = copy.deepcopy(m.optimizer.state_dict()) if not optimizer else None
        step = m.step
        read_checkpoint(directory, m.modules, m.optimizer)
        if saved is not None:  # weights only: the optimizer starts as it was
            m.optimizer.load_state_dict(saved)
            m.step = step

    def export(self, key: str, directory: Path, *, base_name: str | None = None) -> Path:
        """A member's or snapshot's adapter as a PEFT directory."""
        if key in self.snapshots:
            s = self.snapshots[key]
            modules, lora = s.modules, s.lora
        else:
            m = self.member(key)
            assert m.lora is not None
            modules, lora = m.modules, m.lora
        return save_adapter_state(adapter_state(modules), lora, directory,
                                  base_model_name_or_path=base_name)  # fmt: skip

    # -- sampling ----------------------------------------------------------------------------
    def snapshot(self, key: str, name: str) -> str:
        """Freeze member ``key``'s adapter as it is now under ``name`` (a sampler's weights)."""
        m = self.member(key)
        assert m.lora is not None
        self.load_snapshot(name, m.lora, adapter_state(m.modules))
        return name

    @torch.no_grad()
    def load_snapshot(self, name: str, lora: LoraConfig, tensors: dict[str, torch.Tensor]) -> None:
        """A frozen adapter from its PEFT tensors (``adapter_state``'s keys)."""
        if name in self.snapshots:
            return
        modules, _ = self.recipe.attach(name, lora, seed=0, trainable=False)
        for path, layer in modules.items():
            for suffix, tensor in layer.named_lora_tensors().items():
                source = next(v for k, v in tensors.items() if k.endswith(f"{path}.{suffix}"))
                tensor.copy_(source)
        self.snapshots[name] = Snapshot(name, modules, lora)

    def drop_snapshot(self, name: str) -> None:
        s = self.snapshots.pop(name, None)
        if s is not None:
            self.recipe.detach(name, s.modules)

    def sample(self, name: str | None, rows: list[DecodeRow]) -> list[RowOutput]:
        """Decode ``rows`` with snapshot ``name`` (None: the base alone)."""
        if name is not None:
            if name not in self.snapshots:
                raise TrainingError(f"sampler weights {name} are not loaded")
            self.snapshots[name].last_used = time.monotonic()
        return list(self.trainer.sample(name, rows))

    # -- residency ---------------------------------------------------------------------------
    def park(self, key: str) -> None:
        """An idle member's adapter and optimizer state leave the accelerator (host memory
        holds them) until its next call; on a CPU base there is nothing to move."""
        if self.device.type == "cpu" or key in self.parked or key not in self.trainer.members:
            return
        self._move(self.trainer.members[key], torch.device("cpu"))
        self.parked.add(key)

    @staticmethod
    def _move(m: Member, device: torch.device) -> None:
        for layer in m.modules.values():
            layer.to(device)
        for state in m.optimizer.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor):
                    state[k] = v.to(device)
