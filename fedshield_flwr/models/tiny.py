"""Tiny random causal LMs of several architectures, built in code for fast tests.

Each is a real ``transformers`` model (Llama, Qwen2, Mistral, GPT-2 with ``Conv1D`` projections)
with a small byte-level BPE tokenizer trained in code on the embedded Q/A corpus, so nothing is
downloaded. Weights are seeded: the same name always gives the same model.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_ARCHITECTURES = (
    "llama", "qwen2", "mistral", "gpt2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
    "gpt_neox", "opt", "falcon", "olmo2",
)
TINY_VOCAB = 512
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """A 512-token byte-level BPE tokenizer with ChatML specials, trained on the embedded corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedshield_flwr.data.embedded import chatterbot_pairs

    texts = [p["instruction"] + "\n" + p["response"] for p in chatterbot_pairs()]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int = TINY_VOCAB):
    """A small config of architecture ``arch`` (4 layers, hidden 64), built with ``AutoConfig``.

    Each family keeps what makes it different: Gemma's scaled embeddings and tied head, Gemma 2/3
    sliding-window layers and soft-capping, Gemma 3's per-layer rotary, Phi-3's fused qkv,
    GPT-NeoX's and Falcon's parallel blocks, GPT-2's ``Conv1D`` and learned positions, OPT's
    learned positions with biases.
    """
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, tie_word_embeddings=False)
    decoder = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **common,
    )
    sliding = dict(sliding_window=4, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    configs = {
        "llama": dict(decoder),
        "qwen2": dict(decoder),
        "mistral": dict(decoder, sliding_window=None),
        "qwen3": dict(decoder, head_dim=16),
        "olmo2": dict(decoder),
        "gemma": dict(decoder, head_dim=16, tie_word_embeddings=True),
        "gemma2": dict(decoder, head_dim=16, tie_word_embeddings=True, **sliding,
                       query_pre_attn_scalar=16),
        "gemma3_text": dict(decoder, head_dim=16, tie_word_embeddings=True, **sliding,
                            query_pre_attn_scalar=16, rope_local_base_freq=10000.0),
        "phi3": dict(decoder, pad_token_id=0),
        "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=256, **common),
        "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=256,
                         use_parallel_residual=True, **common),
        "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=4, num_attention_heads=4,
                    max_position_embeddings=256, word_embed_proj_dim=64, **common),
        "falcon": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       new_decoder_architecture=False, parallel_attn=True, bias=True,
                       alibi=False, max_position_embeddings=256, **common),
    }
    if arch not in configs:
        raise ValueError(
            f"unknown tiny architecture '{arch}'; known: {', '.join(TINY_ARCHITECTURES)}"
        )
    return AutoConfig.for_model(arch, **configs[arch])


def build_tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    return model


def save_tiny_model(arch: str, out_dir: Path) -> None:
    """Write a loadable directory (config, safetensors weights, tokenizer) for ``tiny:arch``."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(arch)
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
