"""Make a small Llama-architecture model folder locally, as a stand-in for a released checkpoint.

``python examples/tiny_llama.py DEST`` writes what ``LlamaForCausalLM.save_pretrained`` and a fast
tokenizer's ``save_pretrained`` write for a released model (config.json, safetensors weights,
tokenizer.json, tokenizer_config.json, special_tokens_map.json): random weights, grouped-query attention,
``rope_theta`` 500000, untied embeddings, a byte-level BPE tokenizer trained on the Python documentation
that ships with every Python (``pydoc_data``), with ``<s>`` prepended and ``</s>`` ending documents as
Llama's tokenizer does. Nothing is downloaded. Needs ``transformers`` (the ``hf`` extra).

The tests build their models with :func:`make_llama`; ``rpt models import DEST --name NAME`` registers one.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def train_tokenizer(vocab_size: int = 512, *, bos: bool = True):
    """A byte-level BPE on pydoc topics with ``<s>``, ``</s>``, ``<unk>`` (Llama's names); BOS prepended by
    the post-processor when ``bos``."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(topics.values()), trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return tok


def make_llama(dest: str | Path, *, vocab_pad: int = 0, tie: bool = False, kv_heads: int = 2,
               rope_theta: float = 500000.0, rope_scaling: dict[str, Any] | None = None,
               max_shard_size: str | None = None, seed: int = 0, tokenizer_vocab: int = 512) -> Path:
    """Write a random ``LlamaForCausalLM`` (d_model 64, 2 layers, 4 heads) and its tokenizer into ``dest``.

    ``vocab_pad`` extra embedding rows beyond the tokenizer's vocabulary (as released models pad; negative:
    fewer rows than tokens, a broken model for tests);
    ``max_shard_size`` (e.g. ``"50KB"``) writes sharded safetensors with an index.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest = Path(dest)
    tok = train_tokenizer(tokenizer_vocab)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vocab = tok.get_vocab_size() + vocab_pad
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                      rope_theta=rope_theta, rope_scaling=rope_scaling, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dest, safe_serialization=True, **kwargs)
    fast.save_pretrained(dest)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", help="a new folder")
    ap.add_argument("--tie", action="store_true", help="tie the LM head to the embedding")
    a = ap.parse_args()
    if Path(a.dest).exists() and any(Path(a.dest).iterdir()):
        raise SystemExit(f"{a.dest} exists and is not empty: choose a new folder")
    print(f"wrote {make_llama(a.dest, tie=a.tie)}")


if __name__ == "__main__":
    main()
