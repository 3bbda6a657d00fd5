"""Byte-level BPE tokenizer for `rpt data prepare` (Hugging Face `tokenizers`).

Byte-level (GPT-2 style, arXiv:1508.07909 for BPE): the pre-tokenizer maps every byte to one of 256
printable symbols, so any text encodes without an unknown token and decodes back exactly. Special
tokens come first: `<|eos|>` is id 0, `<|pad|>` id 1, then any extra special tokens in order.
Encoding adds no special tokens by itself; the packer appends EOS after every document. Note that
`tokenizers` maps a literal "<|eos|>" in the input text to the special id unless
`tok.encode_special_tokens = True` is set, as the packer does (`data/prepare.py:TokenizeAndPack`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
BASE_SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
BYTE_ALPHABET_SIZE = 256


def all_special_tokens(extra: Sequence[str] = ()) -> list[str]:
    """`<|eos|>`, `<|pad|>`, then the extra special tokens (duplicates of those two are dropped)."""
    out = list(BASE_SPECIAL_TOKENS)
    for token in extra:
        if token not in out:
            out.append(token)
    return out


def min_vocab_size(extra_special_tokens: Sequence[str] = ()) -> int:
    """The smallest useful vocab: 256 byte symbols plus the special tokens."""
    return BYTE_ALPHABET_SIZE + len(all_special_tokens(extra_special_tokens))


def _batched(texts: Iterable[str | Sequence[str]], batch: int = 256) -> Iterator[list[str]]:
    buf: list[str] = []
    for item in texts:
        if isinstance(item, str):
            buf.append(item)
        else:
            buf.extend(item)
        if len(buf) >= batch:
            yield buf
            buf = []
    if buf:
        yield buf


def train_tokenizer(
    texts_iter: Iterable[str | Sequence[str]],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the driver.

    `texts_iter` yields documents (strings) or batches of them. `vocab_size` counts the special tokens
    and the 256 byte symbols; a small corpus can run out of merges and end up smaller (the caller
    reads the real size from `get_vocab_size()`).
    """
    specials = all_special_tokens(special_tokens)
    if vocab_size < BYTE_ALPHABET_SIZE + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{BYTE_ALPHABET_SIZE} byte symbols + {len(specials)} special tokens = "
            f"{BYTE_ALPHABET_SIZE + len(specials)}"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator(_batched(texts_iter), trainer=trainer)
    ids = special_token_ids(tok)
    assert ids[EOS_TOKEN] == 0 and ids[PAD_TOKEN] == 1, ids  # BpeTrainer assigns specials first
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizer.json`; it must define the `<|eos|>` and `<|pad|>` special tokens."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file {str(path)!r} does not exist; pass the path of a tokenizer.json "
            "(for example one written by `rpt data prepare`), or leave `tokenizer` unset to train one"
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{str(path)!r} is not a valid tokenizers JSON file: {exc}") from exc
    missing = [t for t in BASE_SPECIAL_TOKENS if t not in special_token_ids(tok)]
    if missing:
        raise ValueError(
            f"tokenizer {str(path)!r} lacks the special token(s) {missing}; rpt packs documents with "
            f"{EOS_TOKEN} and pads with {PAD_TOKEN}, so add them as special tokens or let "
            "`rpt data prepare` train a tokenizer"
        )
    return tok


def tokenizer_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the tokenizer file's bytes (recorded in the manifest and checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """`{token: id}` of the tokenizer's special tokens, in id order."""
    decoder = tok.get_added_tokens_decoder()  # {id: AddedToken}
    return {decoder[i].content: int(i) for i in sorted(decoder) if decoder[i].special}
