"""Mapping between the Hugging Face Llama checkpoint format and this project's decoder: configs and weight
names, both ways. Pure dict work: no ``transformers`` import, no file access (see :mod:`models.hf_io`).

Supported: Llama-architecture causal LMs (``model_type`` ``llama``, or ``mistral`` without a sliding
window): RMSNorm, SwiGLU with ``silu``, rotary embeddings (plain or Llama 3 scaling), grouped-query
attention, tied or untied embeddings, no biases. Everything else is refused with a :class:`HFFormatError`
naming the file, the field, the value and what is allowed.

Two dialects of ``config.json`` are read: the common one (top-level ``rope_theta``, ``rope_scaling``,
``torch_dtype``) and the one transformers 5 writes (``rope_parameters`` holding ``rope_theta`` and the
scaling type as ``rope_type``, ``dtype``). :func:`to_hf_config` writes the common one, which both
transformers 4.4x and 5.x load (5.x moves the top-level rotary keys into ``rope_parameters`` itself).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from models.config import ResolvedModelConfig, RopeScaling

HF_ARCHITECTURE = "LlamaForCausalLM"
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
_ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Keys a rotary parameter dict may hold besides the Llama 3 ones; anything else is refused.
_ROPE_OTHER_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor", "attention_factor")

# Per-layer weights: our name after "blocks.{i}." <-> the Hugging Face name after "model.layers.{i}.".
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {
    "tok_emb.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_OUR_LAYER = re.compile(r"blocks\.(\d+)\.(.+)")
# Non-weight buffers that older exports stored next to the weights; recomputed from the config.
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class HFFormatError(ValueError):
    """A Hugging Face checkpoint (or a request to write one) that this project cannot convert faithfully."""


def _fail(source: str, field: str, value: Any, allowed: str) -> HFFormatError:
    return HFFormatError(f"{source}: {field}={value!r} is not supported; allowed: {allowed}")


def _require_int(d: Mapping[str, Any], name: str, source: str) -> int:
    value = d.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _fail(source, name, value, "a positive integer (the field is required)")
    return value


def _rope_settings(d: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """rope_theta and the scaling from either dialect. In the transformers 5 dialect ``rope_parameters``
    holds both; in the common one ``rope_theta`` is top-level and ``rope_scaling`` is null or the scaling."""
    scaling, field = d.get("rope_scaling"), "rope_scaling"
    if scaling is None:
        scaling, field = d.get("rope_parameters"), "rope_parameters"
    if scaling is None:
        scaling = {}
    if not isinstance(scaling, Mapping):
        raise _fail(source, field, scaling, "null or an object with rope_type and its parameters")
    nested = [k for k, v in scaling.items() if isinstance(v, Mapping)]
    if nested:
        raise _fail(source, f"{field}.{nested[0]}", scaling[nested[0]],
                    "one rotary setting for every layer (per-layer-type rotary parameters are not supported)")
    theta = scaling.get("rope_theta", d.get("rope_theta", 10000.0))
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta > 0:
        raise _fail(source, "rope_theta", theta, "a number > 0")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise _fail(source, f"{field}.rope_type", rope_type,
                    f"one of {list(_ROPE_TYPES)} or null (no scaling)")
    unknown = sorted(set(scaling) - set(_ROPE_OTHER_KEYS) - set(_LLAMA3_KEYS))
    if unknown:
        raise _fail(source, f"{field}.{unknown[0]}", scaling[unknown[0]],
                    f"only the keys {[*_ROPE_OTHER_KEYS, *_LLAMA3_KEYS]}")
    for where, value in ((f"{field}.partial_rotary_factor", scaling.get("partial_rotary_factor")),
                         ("partial_rotary_factor", d.get("partial_rotary_factor"))):
        if value is not None and value != 1:
            raise _fail(source, where, value, "null or 1.0 (rotary over the whole head)")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is not None and attention_factor != 1:
        raise _fail(source, f"{field}.attention_factor", attention_factor, "null or 1.0")
    if rope_type == "default":
        return float(theta), None
    missing = [k for k in _LLAMA3_KEYS if scaling.get(k) is None]
    if missing:
        raise _fail(source, f"{field}.{missing[0]}", None,
                    f"a number: rope_type llama3 needs {list(_LLAMA3_KEYS)}")
    try:
        return float(theta), RopeScaling(**{k: scaling[k] for k in _LLAMA3_KEYS})
    except ValidationError as exc:
        raise HFFormatError(f"{source}: {field}: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return f"{loc + ': ' if loc else ''}{err['msg']}"


def from_hf_config(d: Mapping[str, Any], *, source: str = "config.json") -> ResolvedModelConfig:
    """A :class:`ResolvedModelConfig` for a Hugging Face Llama-architecture ``config.json`` (as a dict).

    ``source`` names the file in error messages. Defaults follow ``LlamaConfig``'s when a field is absent
    (``num_key_value_heads`` = heads, ``rms_norm_eps`` 1e-6, ``rope_theta`` 10000, untied embeddings); the
    sizes themselves are required. ``max_seq_len`` is ``max_position_embeddings``; ``dropout`` is 0 (the
    model is imported for inference or further training with the project's own settings).

    Raises:
        HFFormatError: another model type or architecture, biases, a sliding window, an activation other
            than silu, a rotary scaling other than llama3, a ``head_dim`` other than hidden / heads or odd,
            a quantized checkpoint, or inconsistent sizes.
    """
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _fail(source, "model_type", model_type,
                    f"one of {list(SUPPORTED_MODEL_TYPES)} (Llama-architecture causal LMs)")
    archs = d.get("architectures")
    if archs is not None and not (isinstance(archs, list) and any(a in _ARCHITECTURES for a in archs)):
        raise _fail(source, "architectures", archs, f"a list containing one of {list(_ARCHITECTURES)}")
    if d.get("quantization_config") is not None:
        raise _fail(source, "quantization_config", "...", "absent: only unquantized weights convert")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag, False) not in (False, None):
            raise _fail(source, flag, d[flag], "false (the decoder's projections have no bias)")
    if d.get("sliding_window") is not None:
        raise _fail(source, "sliding_window", d["sliding_window"],
                    "null or absent (every position attends to the whole context)")
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise _fail(source, "hidden_act", act, "'silu' (SwiGLU MLP)")
    sizes = {name: _require_int(d, name, source) for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "max_position_embeddings")}
    hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _require_int(d, "num_key_value_heads", source)
    if hidden % heads:
        raise _fail(source, "hidden_size", hidden, f"a multiple of num_attention_heads={heads}")
    if heads % kv_heads:
        divisors = [k for k in range(1, heads + 1) if heads % k == 0]
        raise _fail(source, "num_key_value_heads", kv_heads,
                    f"a divisor of num_attention_heads={heads}: {divisors}")
    head_dim = d.get("head_dim")
    if head_dim is not None and head_dim != hidden // heads:
        raise _fail(source, "head_dim", head_dim,
                    f"null or hidden_size / num_attention_heads = {hidden // heads} (the decoder derives it)")
    if (hidden // heads) % 2:
        raise _fail(source, "head_dim", hidden // heads, "an even number (rotary embeddings rotate pairs)")
    eps = d.get("rms_norm_eps", 1e-6)
    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise _fail(source, "tie_word_embeddings", tie, "true or false")
    theta, scaling = _rope_settings(d, source)
    init_std = d.get("initializer_range", 0.02)
    try:
        return ResolvedModelConfig(
            vocab_size=sizes["vocab_size"],
            d_model=hidden,
            n_layers=sizes["num_hidden_layers"],
            n_heads=heads,
            n_kv_heads=kv_heads,
            ffn_hidden=sizes["intermediate_size"],
            max_seq_len=sizes["max_position_embeddings"],
            rope_theta=theta,
            norm_eps=eps,
            tie_embeddings=tie,
            dropout=0.0,
            init_std=init_std if isinstance(init_std, int | float) and init_std > 0 else 0.02,
            rope_scaling=scaling,
        )
    except ValidationError as exc:
        raise HFFormatError(f"{source}: {_first_error(exc)}") from None


def to_hf_config(
    cfg: ResolvedModelConfig,
    *,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The Hugging Face ``config.json`` (``LlamaForCausalLM``) of a decoder with config ``cfg``.

    Written in the common dialect (top-level ``rope_theta``, ``rope_scaling``, ``torch_dtype``) with every
    field explicit (``tie_word_embeddings``, ``head_dim``, no biases), so that transformers 4.4x and 5.x
    both build the same model. ``dtype`` is the dtype the weights are stored in.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise HFFormatError(
            f"to_hf_config: dtype={dtype!r} is not supported; allowed: {list(SUPPORTED_DTYPES)}"
        )
    scaling = None
    if cfg.rope_scaling is not None:
        scaling = {"rope_type": "llama3", **{k: getattr(cfg.rope_scaling, k) for k in _LLAMA3_KEYS}}
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": dtype,
        "use_cache": True,
    }


def native_shapes(cfg: ResolvedModelConfig) -> dict[str, tuple[int, ...]]:
    """Our weight names and shapes for ``cfg``, as :func:`models.io.save_pretrained` stores them (a tied
    LM head is left out)."""
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_hidden
    layer = {
        "attn_norm.weight": (d,),
        "attn.q_proj.weight": (cfg.n_heads * hd, d),
        "attn.k_proj.weight": (cfg.n_kv_heads * hd, d),
        "attn.v_proj.weight": (cfg.n_kv_heads * hd, d),
        "attn.o_proj.weight": (d, cfg.n_heads * hd),
        "mlp_norm.weight": (d,),
        "mlp.w_gate.weight": (f, d),
        "mlp.w_up.weight": (f, d),
        "mlp.w_down.weight": (d, f),
    }
    shapes = {"tok_emb.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in layer.items()})
    shapes["norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def hf_name(name: str) -> str | None:
    """The Hugging Face name of our weight ``name``; None when there is none."""
    m = _OUR_LAYER.fullmatch(name)
    if m:
        rest = _LAYER_NAMES.get(m.group(2))
        return None if rest is None else f"model.layers.{m.group(1)}.{rest}"
    return _TOP_NAMES.get(name)


_FROM_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_FROM_TOP = {v: k for k, v in _TOP_NAMES.items()}


def native_name(name: str) -> str | None:
    """Our name of the Hugging Face weight ``name``; None when there is none."""
    m = _HF_LAYER.fullmatch(name)
    if m:
        rest = _FROM_LAYER.get(m.group(2))
        return None if rest is None else f"blocks.{m.group(1)}.{rest}"
    return _FROM_TOP.get(name)


def _check_names(
    mapped: Mapping[str, Any], unknown: list[str], cfg: ResolvedModelConfig, source: str, hf: bool
) -> None:
    """``mapped`` holds our names; raise on unknown, missing or misshapen weights, naming a few."""
    expected = native_shapes(cfg)
    show = hf_name if hf else (lambda n: n)
    if unknown:
        raise HFFormatError(
            f"{source}: {len(unknown)} weight name(s) have no counterpart, e.g. {sorted(unknown)[:5]}; "
            f"allowed: the Llama weights {sorted(show(n) for n in expected)[:3]}... (biases, adapters and "
            f"other architectures are not supported)"
        )
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise HFFormatError(
            f"{source}: {len(missing)} weight(s) missing, e.g. {[show(n) for n in missing[:5]]}; the config "
            f"(layers={cfg.n_layers}, tie_word_embeddings={cfg.tie_embeddings}) needs them: fix the config "
            f"or the weight files"
        )
    extra = sorted(set(mapped) - set(expected))
    if extra:
        raise HFFormatError(
            f"{source}: weight(s) {[show(n) for n in extra[:5]]} are not used by the config (layers="
            f"{cfg.n_layers}, tie_word_embeddings={cfg.tie_embeddings}); fix the config or the weight files"
        )
    for name, shape in expected.items():
        got = tuple(mapped[name].shape)
        if got != shape:
            raise HFFormatError(
                f"{source}: weight {show(name)} has shape {list(got)}; allowed: {list(shape)} from the "
                f"config (vocab_size={cfg.vocab_size}, hidden_size={cfg.d_model}, heads={cfg.n_heads}/"
                f"{cfg.n_kv_heads}, intermediate_size={cfg.ffn_hidden})"
            )


def _drop_tied_head(state: dict[str, Any], emb_name: str, head_name: str, source: str) -> None:
    import torch

    head = state.pop(head_name)
    emb = state.get(emb_name)
    if emb is not None and not (head.shape == emb.shape and torch.equal(head, emb)):
        raise HFFormatError(
            f"{source}: tie_word_embeddings=true but {head_name} differs from {emb_name}; allowed: equal "
            f"matrices or no {head_name} (set tie_word_embeddings=false if the head is separate)"
        )


def from_hf_state(
    state: Mapping[str, Any], cfg: ResolvedModelConfig, *, source: str = "model.safetensors"
) -> dict[str, Any]:
    """Rename a Hugging Face Llama state dict to ours (tensors are not copied).

    The rotary layout needs no permutation: the Hugging Face Llama checkpoint format rotates dimension
    pairs (i, i + head_dim/2) of q/k ("rotate_half"), which is exactly :func:`models.decoder.apply_rotary`,
    so ``q_proj``/``k_proj`` rows are used as they are (the tests prove it by equal logits). A tied
    checkpoint may carry ``lm_head.weight`` only if it equals the embedding; it is dropped. Old
    ``rotary_emb.inv_freq`` buffers are ignored. Unknown, missing or misshapen weights raise
    :class:`HFFormatError` naming a few.
    """
    state = {k: v for k, v in state.items() if not _HF_IGNORED.fullmatch(k)}
    if cfg.tie_embeddings and "lm_head.weight" in state:
        _drop_tied_head(state, "model.embed_tokens.weight", "lm_head.weight", source)
    out, unknown = {}, []
    for name, tensor in state.items():
        ours = native_name(name)
        if ours is None:
            unknown.append(name)
        else:
            out[ours] = tensor
    _check_names(out, unknown, cfg, source, hf=True)
    return out


def to_hf_state(
    state: Mapping[str, Any], cfg: ResolvedModelConfig, *, source: str = "model.safetensors"
) -> dict[str, Any]:
    """Rename our state dict to Hugging Face Llama names (tensors are not copied); a tied head is left out
    (``tie_word_embeddings`` re-creates it). q/k need no permutation, see :func:`from_hf_state`."""
    state = dict(state)
    if cfg.tie_embeddings and "lm_head.weight" in state:
        _drop_tied_head(state, "tok_emb.weight", "lm_head.weight", source)
    unknown = [n for n in state if hf_name(n) is None]
    _check_names({n: t for n, t in state.items() if hf_name(n) is not None}, unknown, cfg, source, hf=False)
    return {hf_name(n): t for n, t in state.items()}
