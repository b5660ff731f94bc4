"""The embedded default language model: a tiny Qwen3-style decoder (random init, tied embeddings, explicit
``head_dim``) with a byte-level BPE tokenizer trained on the training items' text with ``tokenizers`` and a
ChatML chat template, saved with ``save_pretrained`` so that it loads like any local Qwen3 checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from lmrec.io import atomic_dir

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_default_lm(texts: list[str], out: str | Path, *, hidden_size: int = 128, layers: int = 2, heads: int = 4,
                     kv_heads: int = 2, head_dim: int = 32, vocab_size: int = 2000, max_positions: int = 1024,
                     seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=max_positions)
    fast.chat_template = CHAT_TEMPLATE
    config = Qwen3Config(vocab_size=len(fast), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=max_positions, tie_word_embeddings=True,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        fast.save_pretrained(str(tmp))

    return atomic_dir(out, write)
