"""Build a small Llama-architecture causal LM with seeded weights and a real tokenizer.

There is no model hub here (nor in CI), so tests, benchmarks and the quickstart build their
base locally. The result is an ordinary Hugging Face directory (``config.json``,
``model.safetensors``, tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline — exactly what a real base looks like to
lorafleet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from workers.demo_task import corpus_text
from workers.errors import BaseModelError

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# A documented default chat template, stored with the tokenizer: one line per turn,
# "<role>: content", the assistant's turn closed by the end-of-sequence token.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of the tiny base. Defaults train the demo task in about a minute on 2 cores."""

    layers: int = 2
    hidden: int = 128
    heads: int = 4
    vocab: int = 512
    intermediate: int | None = None
    max_positions: int = 512
    seed: int = 0


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the bundled corpus (deterministic for a given size)."""
    if vocab_size < len(SPECIAL_TOKENS) + 256 + 16:
        raise BaseModelError(f"vocab: must be at least {len(SPECIAL_TOKENS) + 256 + 16}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def create_tiny_base(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a seeded tiny Llama and its tokenizer to ``out_dir`` (Hugging Face format).

    The same spec always yields bitwise-identical weights.

    Raises:
        BaseModelError: an invalid shape (for example hidden not divisible by heads).
    """
    spec = spec or TinySpec()
    if spec.layers < 1 or spec.hidden < 8 or spec.heads < 1:
        raise BaseModelError("layers, hidden and heads must be positive (hidden ≥ 8)")
    if spec.hidden % spec.heads or (spec.hidden // spec.heads) % 2:
        raise BaseModelError(
            f"hidden ({spec.hidden}) must be divisible by heads ({spec.heads}) into an even "
            "head size (rotary embeddings)"
        )
    out = Path(out_dir)
    tokenizer = train_tokenizer(spec.vocab)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate or 4 * spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # 1/sqrt(hidden) rather than the usual 0.02: an untrained net initialised at 0.02 has
        # logits too flat (max gap ≈ 2.5 nats at hidden 128) for any adapter to fit a task.
        initializer_range=spec.hidden**-0.5,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("tiny base written to %s (%d parameters)", out, model.num_parameters())
    return out
