"""The training core: one step and one run loop for every method, alone or packed.

A ``Member`` is one adapter being trained — its LoRA layers, optimizer, configuration,
objective, data and progress. A ``Trainer`` steps every member it holds together: each
micro-step concatenates every member's rows, runs the frozen base once, and each member's
objective scores its own rows from the per-token log-probabilities. A job alone is a trainer
with one member; a pack is one with several; the single-process recipe, the Ray Train worker
and the pack worker only choose how rows reach each member's layers (``route``), how
gradients are summed across workers (``all_reduce``) and what happens around a step
(``RunHooks``: events, checkpoints, results).

Each member's loss is its objective's *sum* over its rows divided by its own global batch's
``units`` (loss tokens, or pairs), so its summed gradient equals one process's gradient over
the global batch exactly, however the batch is split over workers and accumulation steps, and
however many other members share the forward. No two members share a trainable parameter, so
each member's gradient is exactly its solo gradient.

A reference model (DPO) is never a second copy: the reference forward runs the same base
with each member's adapter switched off (a cold start) or with its frozen starting weights
swapped in for the duration of that forward (a warm start).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from workers.errors import TrainingError
from workers.lora.config import LoraConfig
from workers.lora.layer import LoraLinear
from workers.training.batches import (
    collate,
    derived_seed,
    global_batch_indices,
    rank_micro_batches,
    steps_per_epoch,
)
from workers.training.loss import TokenLogprobs, token_logprobs
from workers.training.objectives import Objective
from workers.training.schedule import lr_at
from workers.training.settings import StepReport, TrainConfig

REFERENCE_CACHE_TOKENS = 16 << 20  # reference log-probabilities kept per member (64 MiB)
AllReduce = Callable[[list[torch.Tensor]], None]  # sums tensors in place across workers
Segments = list[tuple[str, int, int]]  # (member key, first row, end row) of a batch
Route = Callable[[Segments], None]  # tells the model's LoRA layers whose rows are whose
ReferenceWeights = dict[str, dict[str, torch.Tensor]]  # module path → suffix → frozen tensor


def _no_reduce(_: list[torch.Tensor]) -> None:
    return None


def _no_route(_: Segments) -> None:
    return None


@dataclass
class Member:
    """One adapter being trained, and its run's progress.

    Attributes:
        reference: the frozen starting adapter's tensors (a warm start), or None: the
            reference is the base with this adapter off.
        regularizer: an extra loss added once per step (AdaLoRA's orthogonality term).
        after_step: called with the new step count after each optimizer step (AdaLoRA's
            rank allocator).
    """

    key: str
    cfg: TrainConfig
    objective: Objective
    items: Sequence[Any]
    modules: dict[str, LoraLinear]
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    eval_items: Sequence[Any] = ()
    reference: ReferenceWeights | None = None
    regularizer: Callable[[], torch.Tensor] | None = None
    after_step: Callable[[int], object] | None = None
    checkpoint_every: int = 0  # steps between checkpoints (0: none)
    lora: LoraConfig | None = None  # what its adapter file's config says
    grader_models: dict[str, Any] = field(default_factory=dict)  # ref → FrozenAdapter
    reference_cache: dict[Any, torch.Tensor] = field(default_factory=dict)  # row → values
    reference_tokens: int = 0
    step: int = 0
    resumed_from: int | None = None
    eval_initial: float | None = None
    last_eval: float | None = None
    tokens: int = 0
    train_s: float = 0.0
    curve: list[dict[str, Any]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.max_steps


def frozen_copy(modules: dict[str, LoraLinear]) -> ReferenceWeights:
    """A detached copy of an adapter's tensors: a warm start's reference (a few MB)."""
    return {path: {k: t.detach().clone() for k, t in layer.named_lora_tensors().items()}
            for path, layer in modules.items()}  # fmt: skip


@contextmanager
def reference_weights(members: Sequence[Member]) -> Iterator[None]:
    """For the duration: each member's layers compute its reference (adapter off, or its
    frozen starting weights swapped in), and are restored exactly afterwards."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for m in members:
                for path, layer in m.modules.items():
                    if m.reference is None:
                        layer.disabled = True
                        continue
                    for suffix, tensor in layer.named_lora_tensors().items():
                        saved.append((tensor, tensor.detach().clone()))
                        tensor.copy_(m.reference[path][suffix])
        yield
    finally:
        with torch.no_grad():
            for tensor, original in saved:
                tensor.copy_(original)
        for m in members:
            for layer in m.modules.values():
                layer.disabled = False


@dataclass(frozen=True)
class Evaluation:
    """A member's mean loss over its evaluation items, and its objective's metrics' means."""

    loss: float
    metrics: dict[str, float]


class RunHooks:
    """What a driver does around the core's steps; every hook is a no-op by default."""

    def on_report(self, member: Member, report: StepReport) -> None:
        """A member took a step (evaluated when due)."""

    def checkpoint(self, member: Member) -> None:
        """A member's checkpoint is due (never at its last step)."""

    def finish(self, member: Member) -> None:
        """A member took its last step; it leaves the trainer after this."""

    def failed(self, member: Member, reason: str) -> None:
        """A member failed (a loss that is not finite); it leaves the trainer after this."""


class Trainer:
    """Steps every member on one frozen ``model``.

    Args:
        model: the base causal LM with the members' LoRA layers in it.
        pad_id: padding token id.
        route: sets which rows of the next forward belong to which member (packed layers);
            a lone member's layers need none.
        world, rank: how many workers share each global batch, and which one this is.
        all_reduce: sums a list of tensors in place across workers (identity when alone).
        device: where batches go (the model must already be there).
        detach: called with a member as it leaves (packed layers drop its rows' update).
        tokenizer: the base's tokenizer (a method that samples, reinforcement, needs it).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        pad_id: int,
        route: Route | None = None,
        detach: Callable[[Member], None] | None = None,
        tokenizer: Any = None,
        world: int = 1,
        rank: int = 0,
        all_reduce: AllReduce | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.route = route or _no_route
        self.detach = detach
        self.tokenizer = tokenizer  # sampling methods decode with it
        self.world, self.rank = world, rank
        self.all_reduce = all_reduce or _no_reduce
        self.device = torch.device(device)
        self.members: dict[str, Member] = {}

    # -- membership (at step boundaries) ----------------------------------------------------
    def global_batch(self, member: Member) -> int:
        return member.cfg.batch_size * self.world * member.cfg.grad_accum

    def add(self, member: Member) -> Member:
        """Take a member in.

        Raises:
            TrainingError: a duplicate key, micro-steps the others cannot share, or a dataset
                smaller than one global batch.
        """
        if member.key in self.members:
            raise TrainingError(f"job {member.key} is already in the pack")
        for other in self.members.values():
            if other.cfg.grad_accum != member.cfg.grad_accum:
                raise TrainingError(f"job {member.key} cannot join: grad_accum "
                                    f"{member.cfg.grad_accum} ≠ {other.cfg.grad_accum} of job "
                                    f"{other.key}")  # fmt: skip
        if member.items:  # a session member (Tinker) brings its data with each call
            steps_per_epoch(len(member.items), self.global_batch(member))  # fail early: tiny data
        self.members[member.key] = member
        return member

    def remove(self, key: str) -> Member:
        """Let a member go (finished, failed or cancelled); the others go on unchanged."""
        member = self.members.pop(key)
        if self.detach is not None:
            self.detach(member)
        return member

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members.values() if not m.done]

    # -- forwards ------------------------------------------------------------------------------
    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _logprobs(self, rows: list[Any], segments: Segments) -> tuple[TokenLogprobs, torch.Tensor]:
        batch = {k: v.to(self.device) for k, v in collate(rows, self.pad_id).items()}
        self.route(segments)
        try:
            with self._autocast():
                return token_logprobs(self.model, batch), batch["attention_mask"]
        finally:
            self.route([])

    def _references(
        self, parts: list[tuple[Member, list[Any], int, int]], rows: list[Any]
    ) -> dict[str, TokenLogprobs]:
        """The reference log-probabilities of the members that need them.

        A member's reference never changes during its run (the base with its adapter off, or
        its frozen starting adapter), so each row's values are computed once — one no-grad
        forward over the rows not seen yet — and kept (up to ``REFERENCE_CACHE_TOKENS`` per
        member): from the second epoch on a DPO step runs no reference forward at all.
        """
        needing = [p for p in parts if p[0].objective.needs_reference]
        if not needing:
            return {}
        sub: list[Any] = []
        segments: Segments = []
        for m, _, start, stop in needing:
            missing = [r for r in rows[start:stop] if r not in m.reference_cache]
            if missing:
                segments.append((m.key, len(sub), len(sub) + len(missing)))
                sub += missing
        computed: dict[int, torch.Tensor] = {}  # rows not kept (a full cache): by position
        if sub:
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad(), reference_weights([p[0] for p in needing]):
                    lp, _ = self._logprobs(sub, segments)
            finally:
                self.model.train(was_training)
            for i, row in enumerate(sub):
                values = lp.values[lp.rows == i].detach().clone()
                m = self.members[next(k for k, a, b in segments if a <= i < b)]
                if m.reference_tokens + len(values) <= REFERENCE_CACHE_TOKENS:
                    m.reference_cache[row] = values
                    m.reference_tokens += len(values)
                computed[id(row)] = values
        out = {}
        for m, _, start, stop in needing:
            kept: list[torch.Tensor] = []
            for r in rows[start:stop]:
                found = m.reference_cache.get(r)
                kept.append(found if found is not None else computed[id(r)])
            row_ids = [torch.full((len(v),), k, dtype=torch.long, device=v.device)
                       for k, v in enumerate(kept)]  # fmt: skip
            out[m.key] = TokenLogprobs(torch.cat(kept), torch.cat(row_ids), stop - start)
        return out

    # -- sampling (reinforcement) -----------------------------------------------------------
    def sample(self, key: str | None, rows: list[Any]) -> list[Any]:
        """Decode ``rows`` (``DecodeRow``) with the adapter routed as ``key`` (a member's
        current one, or a frozen snapshot packed beside them; None: the base alone), through
        the serving engine's own decoder (one sampling implementation in the project)."""
        from workers.serving.stepper import decode_batch

        if self.tokenizer is None:
            raise TrainingError("sampling needs the trainer's tokenizer")
        was_training = self.model.training
        self.model.eval()
        self.route([(key, 0, 1 << 30)] if key is not None else [])  # every row is key's
        try:
            with torch.no_grad():
                return decode_batch(self.model, self.tokenizer, {}, rows)
        finally:
            self.route([])
            self.model.train(was_training)

    def ask(self, member: Member, model: str, chats: list[list[dict[str, str]]], *,
            max_new_tokens: int = 16) -> list[str]:  # fmt: skip
        """Greedy answers of a grader's model to ``chats``: the base (``"base"``) or one of
        ``member``'s grader adapters, on this trainer's base with every trained adapter off."""
        from workers.datasets import DEFAULT_CHAT_TEMPLATE
        from workers.serving.decode import DecodeRow
        from workers.serving.stepper import decode_batch
        from workers.training.graders import BASE_MODEL

        if self.tokenizer is None:
            raise TrainingError("a score_model grader needs the trainer's tokenizer")
        adapter = None
        if model != BASE_MODEL:
            adapter = member.grader_models.get(model)
            if adapter is None:
                raise TrainingError(f"the grader's model {model!r} was not loaded")
        template = getattr(self.tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        rows = [DecodeRow(prompt_ids=list(self.tokenizer.apply_chat_template(
                    chat, chat_template=template, tokenize=True, return_dict=False,
                    add_generation_prompt=True)), max_new_tokens=max_new_tokens, deltas=False)
                for chat in chats]  # fmt: skip
        was_training = self.model.training
        self.model.eval()
        off = [layer for m in self.members.values() for layer in m.modules.values()]
        try:
            for layer in off:
                layer.disabled = True
            with torch.no_grad(), adapter.applied(self.model) if adapter else nullcontext():
                return [o.text for o in decode_batch(self.model, self.tokenizer, {}, rows)]
        finally:
            for layer in off:
                layer.disabled = False
            self.model.train(was_training)

    def _expand(self, m: Member, items: list[Any], *, seed: int, greedy: bool = False) -> list[Any]:
        """Items as the objective trains on them: prompts become graded rollouts (sampled
        now, with the current adapter); any other method's items are what they are."""
        expand = getattr(m.objective, "expand", None)
        if expand is None:
            return items
        return list(expand(items, lambda rows: self.sample(m.key, rows), seed=seed, greedy=greedy,
                           ask=lambda model, chats: self.ask(m, model, chats)))  # fmt: skip

    @staticmethod
    def _metrics(m: Member, sums: torch.Tensor, count: float) -> dict[str, float]:
        means = {n: float(sums[k]) / count if count else float("nan")
                 for k, n in enumerate(m.objective.metric_names)}  # fmt: skip
        finalize = getattr(m.objective, "finalize", None)
        return dict(finalize(means)) if finalize is not None else means

    # -- the two halves of a step (Tinker sessions call them one at a time) -----------------
    def accumulate(
        self,
        batches: Sequence[tuple[Member, Sequence[Any]]],
        denoms: dict[str, float],
        stats: dict[str, torch.Tensor] | None = None,
        *,
        backward: bool = True,
    ) -> dict[str, tuple[torch.Tensor, TokenLogprobs]]:
        """One shared forward (and backward) over every member's ``items``: gradients of
        each member's loss sum divided by ``denoms[key]`` are added to its parameters.

        Args:
            batches: (member, its items) — members with no items are skipped.
            denoms: each member's normaliser (its global batch's units; 1 for a plain sum).
            stats: per member [loss sum, tokens, items, *metric sums], added to in place.
            backward: False: a forward only (no gradient is touched).

        Returns:
            Per member: its loss sum (detached) and its rows' log-probabilities (detached).
        """
        rows: list[Any] = []
        parts: list[tuple[Member, list[Any], int, int]] = []
        for m, items in batches:
            seqs = [s for it in items for s in m.objective.sequences(it)]
            if seqs:
                parts.append((m, list(items), len(rows), len(rows) + len(seqs)))
                rows += seqs
        if not rows:
            return {}
        references = self._references(parts, rows)
        grad = torch.enable_grad() if backward else torch.no_grad()
        out: dict[str, tuple[torch.Tensor, TokenLogprobs]] = {}
        with grad:
            lp, mask = self._logprobs(rows, [(m.key, a, b) for m, _, a, b in parts])
            total: torch.Tensor | float = 0.0
            for m, items, a, b in parts:
                mine = lp.select(a, b)
                loss_sum, metric_sums = m.objective.loss(mine, references.get(m.key), items)
                total = total + loss_sum / denoms[m.key]
                out[m.key] = (loss_sum.detach(), TokenLogprobs(mine.values.detach(), mine.rows,
                                                               mine.n_rows))  # fmt: skip
                if stats is not None:
                    acc = stats[m.key]
                    acc[0] += float(loss_sum.detach())
                    acc[1] += int(mask[a:b].sum())
                    acc[2] += len(items)
                    for k, value in enumerate(metric_sums):
                        acc[3 + k] += float(value)
            if backward and isinstance(total, torch.Tensor) and total.requires_grad:
                total.backward()
        return out

    @staticmethod
    def optimizer_step(member: Member, max_grad_norm: float | None) -> float:
        """Clip ``member``'s gradients to ``max_grad_norm`` (None or ≤ 0: no clipping), take
        its optimizer step and count it; returns the gradient norm before clipping."""
        if max_grad_norm is not None and max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(member.params, max_grad_norm))
        else:
            grads = [p.grad for p in member.params if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        member.optimizer.step()
        member.step += 1
        return norm

    # -- one step of every member ------------------------------------------------------------
    def step(self, failed: dict[str, str] | None = None) -> dict[str, StepReport]:
        """One optimizer step of every unfinished member, sharing each micro-step's forward.

        Args:
            failed: when given, a member whose loss is not finite takes no step and is
                recorded here (key → reason) while the others step on; otherwise that raises.

        Raises:
            TrainingError: a loss that is not finite (without ``failed``).
        """
        active = self.active
        if not active:
            return {}
        t0 = time.perf_counter()
        self.model.train()
        micro_items: dict[str, list[list[Any]]] = {}
        denoms: dict[str, float] = {}
        lrs: dict[str, float] = {}
        local_units: list[float] = []  # members whose items are sampled now: this rank's share
        for m in active:
            c = m.cfg
            indices = global_batch_indices(m.step, n_examples=len(m.items), seed=c.seed,
                                           global_batch=self.global_batch(m))  # fmt: skip
            lrs[m.key] = lr_at(m.step, peak=c.lr, warmup=c.warmup_steps, total=c.max_steps,
                               min_ratio=c.min_lr_ratio)  # fmt: skip
            plan = rank_micro_batches(indices, world=self.world, rank=self.rank,
                                      accum=c.grad_accum)  # fmt: skip
            micro_items[m.key] = [
                self._expand(
                    m, [m.items[i] for i in mb], seed=derived_seed(c.seed, m.step, self.rank, k)
                )
                for k, mb in enumerate(plan)
            ]
            if hasattr(m.objective, "expand"):  # units known only after sampling: summed below
                local_units.append(sum(m.objective.units(it) for mb in micro_items[m.key]
                                       for it in mb))  # fmt: skip
            else:
                denoms[m.key] = sum(m.objective.units(m.items[i]) for i in indices)
            for group in m.optimizer.param_groups:
                group["lr"] = lrs[m.key]
            m.optimizer.zero_grad(set_to_none=False)
        if local_units:  # every rank holds the same members: the same collective everywhere
            units = torch.tensor(local_units, dtype=torch.float64)
            self.all_reduce([units])
            sampled = [m for m in active if hasattr(m.objective, "expand")]
            for m, total_units in zip(sampled, units.tolist(), strict=True):
                denoms[m.key] = max(total_units, 1.0)
        # The RNG (dropout) is a pure function of (seed, step, rank) of the first member: a
        # resumed run draws exactly what the uninterrupted one would have, with no RNG state
        # to checkpoint (a packed member with dropout draws from the shared stream).
        first = active[0]
        torch.manual_seed(first.cfg.seed * 1_000_003 + first.step * 1_009 + self.rank)
        # per member: [loss sum, tokens, items, *metric sums]
        stats = {m.key: torch.zeros(3 + len(m.objective.metric_names), dtype=torch.float64)
                 for m in active}  # fmt: skip
        for micro in range(first.cfg.grad_accum):
            self.accumulate([(m, micro_items[m.key][micro]) for m in active], denoms, stats)
        for m in active:  # AdaLoRA keeps P and Q orthogonal (per worker: 1/world)
            if m.regularizer is not None:
                (m.regularizer() / self.world).backward()
        # one all-reduce for every member's gradients and statistics
        grads = [p.grad for m in active for p in m.params if p.grad is not None]
        flat = torch.cat([stats[m.key] for m in active])
        self.all_reduce([*grads, flat])
        elapsed = time.perf_counter() - t0
        reports: dict[str, StepReport] = {}
        offset = 0
        for m in active:
            width = 3 + len(m.objective.metric_names)
            mine, offset = flat[offset : offset + width], offset + width
            loss = float(mine[0]) / denoms[m.key]
            if not math.isfinite(loss):
                reason = f"loss is not finite at step {m.step} ({loss}); lower lr"
                if failed is None:
                    raise TrainingError(reason if len(self.members) == 1
                                        else f"job {m.key}: {reason}")  # fmt: skip
                failed[m.key] = reason  # the same on every rank: the loss was all-reduced
                continue
            norm = self.optimizer_step(m, m.cfg.max_grad_norm)
            if m.after_step is not None:  # scores from this step's gradients, then prunes
                m.after_step(m.step)
            n = int(mine[1])
            rate = n / elapsed if elapsed > 0 else 0.0
            metrics = self._metrics(m, mine[3:], float(mine[2]))
            reports[m.key] = StepReport(step=m.step, loss=loss, lr=lrs[m.key], grad_norm=norm,
                                        tokens=n, tokens_per_s=rate, elapsed_s=elapsed,
                                        metrics=metrics)  # fmt: skip
        return reports

    @torch.no_grad()
    def evaluate(self, key: str, items: Sequence[Any] | None = None, *,
                 batch_size: int = 32) -> Evaluation:  # fmt: skip
        """Member ``key``'s mean loss (per unit) over ``items`` (default: its evaluation
        items; this worker's share when world > 1), with its objective's metrics (a sampling
        method answers greedily, and its loss is its objective's ``evaluation_loss``)."""
        m = self.members[key]
        mine = list(m.eval_items if items is None else items)[self.rank :: self.world]
        names = m.objective.metric_names
        total = torch.zeros(3 + len(names), dtype=torch.float64)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(mine), batch_size):
                chunk = self._expand(m, mine[start : start + batch_size], greedy=True,
                                     seed=derived_seed(m.cfg.seed, start))  # fmt: skip
                rows = [s for it in chunk for s in m.objective.sequences(it)]
                parts = [(m, chunk, 0, len(rows))]
                references = self._references(parts, rows)
                lp, _ = self._logprobs(rows, [(key, 0, len(rows))])
                loss_sum, metric_sums = m.objective.loss(lp, references.get(key), chunk)
                total[0] += float(loss_sum)
                total[1] += sum(m.objective.units(it) for it in chunk)
                total[2] += len(chunk)
                for k, value in enumerate(metric_sums):
                    total[3 + k] += float(value)
            self.all_reduce([total])
        finally:
            self.model.train(was_training)
        if not total[2]:
            return Evaluation(float("nan"), {})
        metrics = self._metrics(m, total[3:], float(total[2]))
        loss = float(total[0]) / float(total[1]) if total[1] else 0.0
        evaluation_loss = getattr(m.objective, "evaluation_loss", None)
        if evaluation_loss is not None:
            loss = float(evaluation_loss(loss, metrics))
        return Evaluation(loss, metrics)

    # -- the run loop ------------------------------------------------------------------------
    def start(self, key: str) -> None:
        """A member's initial evaluation (a fresh start with evaluation items only)."""
        m = self.members[key]
        if m.resumed_from is None and m.eval_items:
            m.eval_initial = self.evaluate(key).loss

    def run_step(self, hooks: RunHooks | None = None) -> dict[str, StepReport]:
        """One step of every member, then per member: its evaluation when due, its report,
        its checkpoint when due, and its end (finished or failed)."""
        hooks = hooks or RunHooks()
        failed: dict[str, str] = {}
        reports = self.step(failed)
        for key, reason in failed.items():
            hooks.failed(self.members[key], reason)
            if key in self.members:
                self.remove(key)
        for key, report in reports.items():
            m = self.members[key]
            m.tokens += report.tokens
            m.train_s += report.elapsed_s
            last = m.done
            every = m.cfg.eval_every
            if m.eval_items and (last or (every and m.step % every == 0)):
                ev = self.evaluate(key)
                report.eval_loss = m.last_eval = ev.loss
                report.metrics.update({f"eval_{k}": v for k, v in ev.metrics.items()})
            m.curve.append(report.as_curve_point())
            hooks.on_report(m, report)
            if last:
                hooks.finish(m)
                if key in self.members:
                    self.remove(key)
            elif m.checkpoint_every and m.step % m.checkpoint_every == 0:
                hooks.checkpoint(m)
        return reports

    def run(self, hooks: RunHooks | None = None) -> None:
        """Step until every member has finished or failed."""
        for key in list(self.members):
            self.start(key)
        while self.active:
            self.run_step(hooks)


METRICS_EVENT_FIELDS = ("step", "loss", "lr", "tokens_per_s", "eval_loss")


def metrics_event(report: StepReport) -> dict[str, Any]:
    """A step's ``metrics`` job event: what the console's curves read (the objective's
    metrics, such as DPO's rewards, ride along under their own names)."""
    point = report.as_curve_point()
    return {k: v for k, v in point.items()
            if k in METRICS_EVENT_FIELDS or k in report.metrics}  # fmt: skip


def summary(member: Member, **extra: Any) -> dict[str, Any]:
    """A finished member's ``metrics.json``: the one writer of that file's common part
    (``extra`` adds what only one path knows: world size, workers, pack)."""
    cfg = member.cfg
    last = member.curve[-1] if member.curve else {}
    # the objective's metrics at the last step (DPO's rewards, GRPO's reward), beside the loss
    names = [*member.objective.metric_names, *(f"eval_{n}" for n in member.objective.metric_names)]
    final = {n: last[n] for n in names if n in last}
    return {
        "method": member.objective.name,
        **final,
        "steps": member.step,
        "resumed_from_step": member.resumed_from,
        "eval_loss_initial": member.eval_initial,
        "eval_loss_final": member.last_eval,
        "tokens_per_s": member.tokens / member.train_s if member.train_s else 0.0,
        "train_time_s": member.train_s,
        "train": asdict(cfg),
        **({"lora": member.lora.as_dict()} if member.lora is not None else {}),
        **extra,
        "curve": member.curve,
    }
