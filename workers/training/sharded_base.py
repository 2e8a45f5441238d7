"""The frozen base sharded across a node's workers: FSDP2 on a 2-D mesh (HSDP).

The mesh has one row per node and one column per worker of a node: ``fully_shard`` shards
each decoder layer (then the root) along the row — so a base weight is all-gathered only among
the workers of one node — and replicates along the column. Every base parameter is frozen, so
FSDP never reduces a gradient across nodes; the LoRA parameters are left out of FSDP
(``ignored_params``: replicated on every worker) and their gradients are summed across all
workers by the recipe's one flat all-reduce. Do not use FSDP1's ``HYBRID_SHARD`` here: it
reduces full-size gradients for frozen weights too.

The model starts on the meta device: no rank ever builds the full base. Each rank reads one
tensor at a time from the base's safetensors files and keeps only its own shard.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from workers.base_model import load_base_config
from workers.errors import BaseModelError
from workers.lora import LoraConfig, inject_lora, lora_parameters
from workers.training.shared_base import params_on_meta

log = logging.getLogger(__name__)


def node_mesh_layout(node_ids: list[str]) -> list[list[int]]:
    """Ranks as a (nodes × workers-per-node) grid, rows in order of each node's first rank.

    Raises:
        BaseModelError: nodes with different worker counts (a 2-D mesh needs equal rows).
    """
    rows: dict[str, list[int]] = {}
    for rank, node in enumerate(node_ids):
        rows.setdefault(node, []).append(rank)
    layout = list(rows.values())
    if len({len(r) for r in layout}) != 1:
        raise BaseModelError(
            f"shard_per_node needs the same number of workers on every node, got "
            f"{[len(r) for r in layout]}"
        )
    return layout


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise BaseModelError("shard_per_node needs a decoder with a `layers` list (Llama-like)")
    return list(layers)


def load_sharded_base(
    base_dir: str | Path,
    lora: LoraConfig,
    node_ids: list[str],
    *,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, object]:
    """Build the LoRA model with its frozen base sharded within each node.

    Returns:
        The model (LoRA injected; LoRA parameters replicated, outside FSDP) and the mesh.
    """
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    layout = node_mesh_layout(node_ids)
    device = torch.device(device)
    mesh = DeviceMesh(device.type, torch.tensor(layout), mesh_dim_names=("node", "local"))
    config = load_base_config(base_dir)
    if getattr(config, "tie_word_embeddings", False):
        raise BaseModelError("shard_per_node does not support tied input/output embeddings yet")
    if lora.base_quantization != "none":
        raise BaseModelError("a quantized base is held whole on each device, not sharded: "
                             "drop shard_per_node for QLoRA")  # fmt: skip
    if lora.use_dora:  # ‖W0‖ per row needs whole rows, and each rank holds a shard of them
        raise BaseModelError("DoRA on a base sharded across GPUs is not supported yet: "
                             "train DoRA on CPU workers or one GPU per node")  # fmt: skip
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    model.requires_grad_(False)
    torch.manual_seed(0)
    inject_lora(model, lora)
    for p in lora_parameters(model):  # LoRA lives outside FSDP, replicated on each device
        p.data = p.data.to(device)
    ignored: set[nn.Parameter] = {p for p in lora_parameters(model) if isinstance(p, nn.Parameter)}
    # HSDP: replicate over dim 0 (nodes), shard over dim 1 (a node's workers).
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, ignored_params=ignored)
    fully_shard(model, mesh=mesh, ignored_params=ignored)

    # Allocate only the local shards, keeping buffers (rotary tables) and the LoRA init.
    keep = {n: b.detach().clone() for n, b in model.named_buffers()}
    keep.update({n: p.detach().clone() for n, p in model.named_parameters() if p in ignored})
    model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in keep.items():
            target = model.get_parameter(name) if "lora_" in name else model.get_buffer(name)
            target.copy_(tensor)
        _load_local_shards(model, Path(base_dir))
    model.eval()
    for p in ignored:
        p.requires_grad_(True)
    for name, p in model.named_parameters():
        if p not in ignored and not isinstance(p, DTensor):
            raise BaseModelError(f"parameter {name} is not sharded")
    return model, mesh


def _load_local_shards(model: nn.Module, base_dir: Path) -> None:
    """Copy each rank's shard of every base tensor, reading one full tensor at a time."""
    from torch.distributed.tensor import DTensor, Shard

    files = sorted(base_dir.glob("*.safetensors"))
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                where[key] = f
    for name, param in model.named_parameters():
        if not isinstance(param, DTensor):
            continue
        file_key = name.replace(".base_layer.", ".")
        if file_key not in where:
            raise BaseModelError(f"{base_dir} has no tensor {file_key}")
        with safe_open(str(where[file_key]), framework="pt") as fh:
            full = fh.get_tensor(file_key).to(param.dtype)
        local = param.to_local()
        shard_dims = [
            (mesh_dim, pl.dim)
            for mesh_dim, pl in enumerate(param.placements)
            if isinstance(pl, Shard)
        ]
        piece = full
        for mesh_dim, dim in shard_dims:
            size = param.device_mesh.size(mesh_dim)
            coord = param.device_mesh.get_coordinate()
            assert coord is not None
            chunks = list(torch.chunk(piece, size, dim=dim))
            chunks += [piece.new_empty((0, *piece.shape[1:]))] * (size - len(chunks))
            piece = chunks[coord[mesh_dim]]
        if tuple(local.shape) != tuple(piece.shape):
            raise BaseModelError(
                f"shard of {name} has shape {tuple(local.shape)}, expected {tuple(piece.shape)}"
            )
        local.copy_(piece)
        del full


def local_base_bytes(model: nn.Module) -> int:
    """Bytes of base parameters this rank holds (its shards only)."""
    from torch.distributed.tensor import DTensor

    return sum(
        p.to_local().numel() * p.element_size()
        for p in model.parameters()
        if isinstance(p, DTensor)
    )
