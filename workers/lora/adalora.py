"""AdaLoRA's rank allocation (Zhang et al., 2023, arXiv:2303.10512).

Each adapted layer holds its update in SVD form, ΔW = P Λ Q (``lora_B``, ``lora_E``,
``lora_A``). The allocator spends a total rank budget where the layers need it:

- importance of a parameter w: sensitivity I = |w · ∂L/∂w|, smoothed Ī ← β₁Ī + (1−β₁)I, and
  its uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|; s(w) = Ī · Ū (eq. 8–10);
- importance of triplet i of a layer: S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji) (eq. 11);
- budget b(t) (cubic schedule, eq. 12): the initial r per layer until ``tinit``, falling to
  ``target_r`` per layer at ``total_step − tfinal``, constant after; every ``delta_t`` steps
  (and at every step of the final phase) the λ of all but the b(t) most important triplets,
  over all layers, are set to zero.

``orthogonal_regularizer`` is the paper's R(P, Q) = ‖PᵀP − I‖_F + ‖QQᵀ − I‖_F, averaged over
the matrices as PEFT does. ``to_plain_lora`` turns a trained AdaLoRA layer into the plain LoRA
pair serving uses: the kept triplets only, Λ folded into A.
"""

from __future__ import annotations

import torch

from workers.lora.config import AdaLoraSchedule
from workers.lora.layer import LoraLinear


def budget_at(step: int, schedule: AdaLoraSchedule, init_r: int, n_layers: int) -> tuple[int, bool]:
    """(total rank budget at ``step``, whether to prune at this step)."""
    init, target = init_r * n_layers, schedule.target_r * n_layers
    end = schedule.total_step - schedule.tfinal
    if step <= schedule.tinit:
        return init, False
    if step > end:
        return target, True
    progress = 1 - (step - schedule.tinit) / (end - schedule.tinit)
    budget = int((init - target) * progress**3 + target)
    return budget, step % schedule.delta_t == 0


def orthogonal_regularizer(layers: dict[str, LoraLinear]) -> torch.Tensor:
    """Mean over every P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (r × r each)."""
    terms = []
    for layer in layers.values():
        q, p = layer.lora_A.weight, layer.lora_B.weight  # Q: r × in, P: out × r
        eye = torch.eye(q.shape[0], dtype=q.dtype, device=q.device)
        terms.append(torch.linalg.matrix_norm(q @ q.T - eye))
        terms.append(torch.linalg.matrix_norm(p.T @ p - eye))
    return torch.stack(terms).mean()


class RankAllocator:
    """Scores triplets from gradients and prunes λ to the scheduled budget.

    Call ``step(t)`` after the optimizer step of step t (gradients still in place). Every rank
    of a data-parallel group sees the same all-reduced gradients and so prunes the same
    triplets.
    """

    def __init__(self, layers: dict[str, LoraLinear], schedule: AdaLoraSchedule, init_r: int):
        self.layers, self.schedule, self.init_r = layers, schedule, init_r
        self.ipt: dict[int, torch.Tensor] = {}
        self.unc: dict[int, torch.Tensor] = {}
        self.final: dict[str, torch.Tensor] | None = None  # the mask of the final phase
        self.budget = init_r * len(layers)

    def _score(self, p: torch.Tensor) -> torch.Tensor:
        """s(w) = Ī · Ū for one parameter, updating its EMAs (zeros before any gradient)."""
        key = id(p)
        if key not in self.ipt:
            self.ipt[key] = torch.zeros_like(p, dtype=torch.float32)
            self.unc[key] = torch.zeros_like(p, dtype=torch.float32)
        if p.grad is not None:
            sens = (p.detach() * p.grad.detach()).abs().to(torch.float32)
            b1, b2 = self.schedule.beta1, self.schedule.beta2
            self.ipt[key].mul_(b1).add_(sens, alpha=1 - b1)
            self.unc[key].mul_(b2).add_((sens - self.ipt[key]).abs(), alpha=1 - b2)
        return self.ipt[key] * self.unc[key]

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """S_i per layer (r,), from the current gradients."""
        out = {}
        for path, layer in self.layers.items():
            s_e = self._score(layer.lora_E).reshape(-1)
            s_a = self._score(layer.lora_A.weight).mean(dim=1)
            s_b = self._score(layer.lora_B.weight).mean(dim=0)
            out[path] = s_e + s_a + s_b
        return out

    @torch.no_grad()
    def _apply(self, keep: dict[str, torch.Tensor]) -> None:
        for path, layer in self.layers.items():
            layer.lora_E.masked_fill_(~keep[path][:, None], 0.0)

    @torch.no_grad()
    def step(self, step: int) -> int:
        """Score, and prune if the schedule says so; returns the budget in force."""
        if self.final is not None:  # the final phase: the same triplets stay pruned
            self._apply(self.final)
            return self.budget
        scores = self.triplet_scores()
        budget, prune = budget_at(step, self.schedule, self.init_r, len(self.layers))
        self.budget = budget
        if not prune:
            return budget
        flat = torch.cat(list(scores.values()))
        if budget < flat.numel():
            threshold = torch.kthvalue(flat, flat.numel() - budget).values
            keep = {p: s > threshold for p, s in scores.items()}
        else:
            keep = {p: torch.ones_like(s, dtype=torch.bool) for p, s in scores.items()}
        self._apply(keep)
        if step > self.schedule.total_step - self.schedule.tfinal:
            self.final = keep
        return budget

    def ranks(self) -> dict[str, int]:
        """Each layer's rank now: its triplets with λ ≠ 0."""
        return {p: int((layer.lora_E != 0).sum()) for p, layer in self.layers.items()}


def to_plain_lora(
    a: torch.Tensor, b: torch.Tensor, e: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept triplets of an AdaLoRA layer as a plain pair: A′ = (A ⊙ E)[kept], B′ = B[:, kept]
    (B′A′ = B (A ⊙ E) exactly; the scaling is unchanged). A layer with nothing kept keeps one
    zero direction, so it stays a well-formed LoRA pair."""
    kept = e.reshape(-1) != 0
    if not bool(kept.any()):
        return torch.zeros_like(a[:1]), torch.zeros_like(b[:, :1])
    return (a * e)[kept].contiguous(), b[:, kept].contiguous()
