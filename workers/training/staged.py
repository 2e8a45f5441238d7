"""What a training worker keeps in the object store: staged checkpoints and results.

Nodes share only the catalog and the object store, so a member's checkpoint is staged there
(any node can resume it) and so is a finished adapter (the driver publishes it from there).
Alone or packed, every member checkpoints and resumes through these two functions.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from storage.errors import IntegrityError, ObjectNotFound, ObjectStoreUnavailable
from storage.objects import ObjectStore
from storage.retry import with_retries
from storage.staging import (
    checkpoint_prefix,
    checkpoints,
    fetch_staged,
    prune_checkpoints,
    stage_dir,
)
from workers.training.checkpoint import read_checkpoint, write_checkpoint
from workers.training.core import Member
from workers.training.events import EventSink

log = logging.getLogger(__name__)
STORE_OUTAGE_S = 300.0  # how long a checkpoint or result upload rides out a store outage


def stage_with_retries(store: ObjectStore, local_dir: Path, prefix: str) -> None:
    """``stage_dir`` through an object store outage (it starts over cleanly on each try)."""
    with_retries(lambda: stage_dir(store, local_dir, prefix), retry_on=(ObjectStoreUnavailable,),
                 deadline_s=STORE_OUTAGE_S, what=f"staging {prefix}")  # fmt: skip


def stage_checkpoint(
    member: Member, checkpoint_key: str, store: ObjectStore, sink: EventSink | None
) -> None:
    """Rank 0: stage a member's checkpoint, keep its newest two, record it."""
    prefix = checkpoint_prefix(checkpoint_key, member.step)
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(Path(tmp), member.modules, member.optimizer, member.step)
        stage_with_retries(store, Path(tmp), prefix)
    try:
        prune_checkpoints(store, checkpoint_key, keep=2)
    except ObjectStoreUnavailable as exc:  # older checkpoints linger until the next prune
        log.warning("pruning checkpoints failed: %s", exc)
    if sink is not None:
        sink("checkpoint", {"step": member.step, "uri": f"{store.uri}/{prefix}"})


def resume_member(member: Member, checkpoint_key: str, store: ObjectStore) -> int | None:
    """Load a member's newest readable checkpoint (one format, alone or packed); returns the
    step it resumes from, or None (no checkpoint: a fresh start).

    One way back for every restart — Ray Train restarting the worker group after a lost
    worker or node, or the scheduler starting a new attempt after a lost runner: the newest
    complete checkpoint in the object store, verified, on whichever node. A checkpoint that
    cannot be read (bytes gone or corrupt) is skipped for an older one.
    """
    for _, prefix in checkpoints(store, checkpoint_key):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                member.step = read_checkpoint(fetch_staged(store, prefix, Path(tmp)),
                                              member.modules, member.optimizer)  # fmt: skip
        except (ObjectNotFound, IntegrityError) as exc:
            log.warning("checkpoint %s unusable (%s); trying an older one", prefix, exc)
            continue
        member.resumed_from = member.step
        return member.step
    return None
