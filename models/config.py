"""Model sizes: a named preset plus explicit overrides (:class:`ModelConfig`, what a run config holds),
resolved against the run's tokenizer and sequence length into a complete :class:`ResolvedModelConfig`
(what :class:`models.decoder.DecoderLM` is built from and what ``model_config.json`` stores).

This module imports no torch, so the driver can validate configs cheaply.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from models import presets

log = logging.getLogger(__name__)

FFN_MULTIPLE_OF = 64
"""``ffn_hidden`` defaults to 8/3 * d_model rounded up to a multiple of this."""

_SIZE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len")
_REQUIRED_SIZES = ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len")


def default_ffn_hidden(d_model: int) -> int:
    """SwiGLU hidden width used when ``ffn_hidden`` is not set: 8/3 * d_model, rounded up to a multiple of 64.

    A SwiGLU MLP has three weight matrices instead of two; a hidden width of 8/3 * d_model keeps its
    parameters and FLOPs equal to those of a 4 * d_model GELU MLP (Shazeer, arXiv 2002.05202, section 2).
    The rounding keeps matmul shapes friendly to tensor cores. d_model=768 -> 2048, 256 -> 704, 64 -> 192.
    """
    return FFN_MULTIPLE_OF * -(-8 * d_model // (3 * FFN_MULTIPLE_OF))


def _check_shapes(values: Mapping[str, Any]) -> None:
    """Cross-field checks on whichever of d_model / n_heads / n_kv_heads are known."""
    d_model, n_heads, n_kv_heads = values.get("d_model"), values.get("n_heads"), values.get("n_kv_heads")
    if d_model is not None and n_heads is not None:
        if d_model % n_heads:
            raise ValueError(
                f"d_model={d_model} is not divisible by n_heads={n_heads}; "
                f"allowed: d_model a multiple of n_heads (head_dim = d_model / n_heads)"
            )
        if (d_model // n_heads) % 2:
            raise ValueError(
                f"d_model={d_model} with n_heads={n_heads} gives an odd head_dim={d_model // n_heads}; "
                f"allowed: d_model / n_heads even (rotary embeddings rotate pairs of dimensions)"
            )
    if n_heads is not None and n_kv_heads is not None and n_heads % n_kv_heads:
        divisors = [k for k in range(1, n_heads + 1) if n_heads % k == 0]
        raise ValueError(
            f"n_kv_heads={n_kv_heads} does not divide n_heads={n_heads}; allowed: one of {divisors}"
        )


class RopeScaling(BaseModel):
    """Llama 3 rotary frequency scaling (``rope_type: llama3``), as Llama 3.1 extends its context
    (Llama 3 paper, arXiv 2407.21783; the ``rope_scaling`` entry of the Hugging Face Llama checkpoint format).

    Each rotary frequency f has the wavelength w = 2 pi / f. With L = ``original_max_position_embeddings``:
    frequencies whose wavelength is shorter than L / ``high_freq_factor`` are kept, those longer than
    L / ``low_freq_factor`` are divided by ``factor``, and the ones in between are interpolated linearly in
    L / w between the two (see :func:`models.decoder.rotary_inv_freq`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rope_type: Literal["llama3"] = Field("llama3", description="the only scaling supported")
    factor: float = Field(description="divisor of the low frequencies (Llama 3.1: 8, and 1 and 4 below)")
    low_freq_factor: float = Field(description="L / low_freq_factor: longest wavelength kept in part (1)")
    high_freq_factor: float = Field(description="L / high_freq_factor: longest wavelength kept as is (4)")
    original_max_position_embeddings: int = Field(description="L: the context length of pre-training (8192)")

    @field_validator("factor", "low_freq_factor", "original_max_position_embeddings")
    @classmethod
    def _positive(cls, value: float, info: ValidationInfo) -> float:
        if not value > 0:
            raise ValueError(f"rope_scaling.{info.field_name}={value} is not allowed; allowed: a number > 0")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> RopeScaling:
        if not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                f"rope_scaling.high_freq_factor={self.high_freq_factor} is not allowed with "
                f"low_freq_factor={self.low_freq_factor}; allowed: high_freq_factor > low_freq_factor"
            )
        return self


class _FieldChecks(BaseModel):
    """Per-field checks shared by :class:`ModelConfig` and :class:`ResolvedModelConfig`."""

    model_config = ConfigDict(extra="forbid")

    @field_validator(*_SIZE_FIELDS, check_fields=False)
    @classmethod
    def _positive(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"{info.field_name}={value} is not allowed; allowed: a positive integer")
        return value

    @field_validator("rope_theta", "norm_eps", "init_std", check_fields=False)
    @classmethod
    def _positive_float(cls, value: float, info: ValidationInfo) -> float:
        if not value > 0:
            raise ValueError(f"{info.field_name}={value} is not allowed; allowed: a number > 0")
        return value

    @field_validator("dropout", check_fields=False)
    @classmethod
    def _probability(cls, value: float) -> float:
        if not 0.0 <= value < 1.0:
            raise ValueError(f"dropout={value} is not allowed; allowed: 0 <= dropout < 1")
        return value


class ResolvedModelConfig(_FieldChecks):
    """Every size of a decoder LM, after preset, overrides and runtime facts are applied.

    Immutable; ``model_config.json`` is this object as JSON.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(description="rows of the token embedding / columns of the LM head")
    d_model: int = Field(description="residual stream width")
    n_layers: int = Field(description="transformer blocks")
    n_heads: int = Field(description="query heads; head_dim = d_model / n_heads")
    n_kv_heads: int = Field(description="key/value heads (grouped-query attention); divides n_heads")
    ffn_hidden: int = Field(description="SwiGLU hidden width")
    max_seq_len: int = Field(description="longest input the rotary tables cover")
    rope_theta: float = Field(10000.0, description="rotary base (Su et al., arXiv 2104.09864)")
    norm_eps: float = Field(1e-5, description="RMSNorm epsilon")
    tie_embeddings: bool = Field(True, description="LM head shares the token embedding matrix")
    dropout: float = Field(
        0.0, description="dropout on embeddings, attention probabilities and residual branches"
    )
    init_std: float = Field(
        0.02, description="std of the normal init; output projections use std / sqrt(2 n_layers)"
    )
    rope_scaling: RopeScaling | None = Field(
        None, description="None: plain rotary frequencies; else Llama 3 frequency scaling (RopeScaling)"
    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @model_validator(mode="after")
    def _check(self) -> ResolvedModelConfig:
        _check_shapes(self.model_dump())
        return self


class ModelConfig(_FieldChecks):
    """The ``model:`` section of a run config: a preset name and explicit overrides of its fields.

    Precedence when resolving (:meth:`resolve`): preset < runtime argument (tokenizer vocabulary, run
    sequence length) < explicit field. Unset sizes stay ``None`` here and are filled in by ``resolve``.
    Consistency (d_model / n_heads / n_kv_heads) is checked on the preset merged with the overrides as
    soon as the config is validated, so a bad combination fails on the driver.
    """

    preset: str | None = Field(
        "tiny", description="named size (models.available()); None: every size must be given explicitly"
    )
    vocab_size: int | None = Field(
        None,
        description="None: the tokenizer's vocabulary (else the preset's); if set, at least the tokenizer's",
    )
    d_model: int | None = Field(None, description="residual stream width")
    n_layers: int | None = Field(None, description="transformer blocks")
    n_heads: int | None = Field(None, description="query heads; d_model / n_heads must be even")
    n_kv_heads: int | None = Field(
        None, description="key/value heads (grouped-query attention); None: n_heads"
    )
    ffn_hidden: int | None = Field(
        None, description="SwiGLU hidden width; None: 8/3 * d_model rounded up to a multiple of 64"
    )
    max_seq_len: int | None = Field(
        None, description="None: the run's seq_len (else the preset's); if set, at least the run's seq_len"
    )
    rope_theta: float = Field(10000.0, description="rotary base (Su et al., arXiv 2104.09864)")
    norm_eps: float = Field(1e-5, description="RMSNorm epsilon")
    tie_embeddings: bool = Field(True, description="LM head shares the token embedding matrix")
    dropout: float = Field(
        0.0, description="dropout on embeddings, attention probabilities and residual branches"
    )
    init_std: float = Field(
        0.02, description="std of the normal init; output projections use std / sqrt(2 n_layers)"
    )
    rope_scaling: RopeScaling | None = Field(
        None, description="None: plain rotary frequencies; else Llama 3 frequency scaling (RopeScaling)"
    )

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str | None) -> str | None:
        if value is not None:
            presets.get(value)  # raises ValueError listing the available presets
        return value

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        _check_shapes(self._merged())
        return self

    def _explicit(self, name: str) -> bool:
        return name in self.model_fields_set and getattr(self, name) is not None

    def _merged(self) -> dict[str, Any]:
        """Preset fields overlaid with the explicitly set ones; unset fields at their defaults."""
        values = presets.get(self.preset) if self.preset is not None else {}
        for name in type(self).model_fields:
            if name == "preset":
                continue
            if self._explicit(name) or name not in values:
                values[name] = getattr(self, name)
        return values

    def resolve(self, vocab_size: int | None = None, max_seq_len: int | None = None) -> ResolvedModelConfig:
        """Complete sizes for this run.

        Args:
            vocab_size: the tokenizer's vocabulary size; replaces the preset's. An explicit
                ``vocab_size`` field wins but must be at least this (extra rows are padding).
            max_seq_len: the run's sequence length; replaces the preset's. An explicit ``max_seq_len``
                field wins but must be at least this.

        Raises:
            ValueError: a required size is missing (``preset=None`` without it), or an explicit field is
                smaller than the runtime value, or the result is inconsistent.
        """
        values = self._merged()
        for name, runtime in (("vocab_size", vocab_size), ("max_seq_len", max_seq_len)):
            if runtime is None:
                continue
            if runtime <= 0:
                raise ValueError(f"resolve({name}={runtime}): allowed: a positive integer")
            if self._explicit(name):
                if values[name] < runtime:
                    raise ValueError(
                        f"model.{name}={values[name]} is smaller than the run needs ({runtime}); "
                        f"allowed: model.{name} >= {runtime}, or leave it unset to use {runtime}"
                    )
                continue
            if values[name] is not None and values[name] != runtime:
                log.info(
                    "model.%s: using %d from the run instead of preset %r's %d",
                    name,
                    runtime,
                    self.preset,
                    values[name],
                )
            values[name] = runtime
        missing = [name for name in _REQUIRED_SIZES if values[name] is None]
        if missing:
            raise ValueError(
                f"model sizes {missing} are not set (preset={self.preset!r}); set them explicitly or choose "
                f"a preset from {presets.available()}"
            )
        if values["n_kv_heads"] is None:
            values["n_kv_heads"] = values["n_heads"]
        if values["ffn_hidden"] is None:
            values["ffn_hidden"] = default_ffn_hidden(values["d_model"])
        return ResolvedModelConfig(**values)


def resolve_config(
    spec: str | Mapping[str, Any] | ModelConfig | ResolvedModelConfig,
    *,
    vocab_size: int | None = None,
    max_seq_len: int | None = None,
) -> ResolvedModelConfig:
    """Resolve a preset name, a ``model:`` dict, a :class:`ModelConfig` or a resolved config.

    A :class:`ResolvedModelConfig` counts as all-explicit: runtime values may not exceed its sizes.
    """
    if isinstance(spec, ResolvedModelConfig):
        spec = ModelConfig(preset=None, **spec.model_dump())
    elif isinstance(spec, str):
        spec = ModelConfig(preset=spec)
    elif isinstance(spec, Mapping):
        spec = ModelConfig.model_validate(dict(spec))
    elif not isinstance(spec, ModelConfig):
        raise TypeError(
            f"model spec must be a preset name, a dict or a ModelConfig, not {type(spec).__name__}"
        )
    return spec.resolve(vocab_size=vocab_size, max_seq_len=max_seq_len)
