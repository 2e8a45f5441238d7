"""Spectrum and rank reduction on the demo task: an r = 16 adapter (q/v, 300 steps), the rank
keeping 99 % (and 90 %) of every layer's energy, and the exact-match score on the held-out
prompts before and after compressing to that rank (truncated SVD of each layer's s·B·A).

Deterministic (seeded training, greedy decoding): one run is the figure; a second run gives
the same numbers. Writes ``bench/results/spectrum.json``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import environment, write_result
from workers.demo_task import TRAIN_FILE, heldout_exact_match
from workers.lora import LoraConfig
from workers.lora.io import read_adapter_config, read_adapter_weights, save_adapter_state
from workers.lora.spectrum import adapter_spectrum, compress
from workers.tiny_base import create_tiny_base
from workers.training.recipe import TrainConfig
from workers.training.single import train_single


def main() -> None:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-spectrum-"))
    base = create_tiny_base(work / "base")
    trained = train_single(
        base_dir=base, data_path=TRAIN_FILE, out_dir=work / "r16",
        lora=LoraConfig(r=16, alpha=32, target_modules=("q_proj", "v_proj")),
        train=TrainConfig(max_steps=300, lr=3e-3, batch_size=16, seq_len=64, eval_every=0,
                          warmup_steps=10),
    )  # fmt: skip
    config = read_adapter_config(trained.adapter_dir)
    weights = read_adapter_weights(trained.adapter_dir)
    spectrum = adapter_spectrum(weights, config)
    small = compress(weights, config, energy=0.99)
    small_dir = save_adapter_state(small.weights, small.config, work / "compressed")
    em_full = heldout_exact_match(base, trained.adapter_dir)
    em_small = heldout_exact_match(base, small_dir)
    payload = {
        "environment": environment(1), "r": 16, "rank_90": spectrum.rank_90,
        "rank_99": spectrum.rank_99, "compressed_rank": small.rank,
        "energy_kept_min": small.energy_kept_min, "size_ratio": small.size_ratio,
        "exact_match_full": em_full, "exact_match_compressed": em_small,
        "exact_match_kept": em_small / em_full if em_full else None,
        "layers": [x.as_dict() for x in spectrum.layers],
    }  # fmt: skip
    path = write_result("spectrum", payload)
    print(f"r=16: 90 % energy at rank {spectrum.rank_90}, 99 % at rank {spectrum.rank_99}; "
          f"compressed to rank {small.rank}: exact match {em_full:.0%} → {em_small:.0%}, size "
          f"{small.size_ratio:.3f}×; wrote {path}")  # fmt: skip


if __name__ == "__main__":
    main()
