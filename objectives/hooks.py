"""The optional hooks every objective may override, declared once with no-op defaults.

The driver and the training loop call them on every objective, so nothing objective-specific is found by
probing attributes:

| hook | called | default | overridden by |
|---|---|---|---|
| :meth:`required_special_tokens` | driver and worker | none | ``mlm``, ``span_corruption``, ``ul2`` |
| :meth:`check_data` | driver, before Ray starts | nothing to check | token objectives (special tokens), ``self_distillation`` (teacher) |
| :meth:`fill_params` | driver, after the data checks | params unchanged | ``clip`` (classes from the data) |
| :meth:`set_step` | worker, before every step | no-op | ``hpm`` (the easy-to-hard ramp, the EMA teacher's update) |
| :meth:`reduce_metrics` | worker, at every logging step | metrics unchanged | ``ul2`` (per-denoiser cross-entropy) |
| :meth:`class_text_embeddings` | worker, at evaluation | ``None`` (no text tower) | ``clip`` (zero-shot probe) |
| :meth:`check_trainer` | driver, when the config is validated | any engine and stage | ``hpm`` (whole parameters) |
"""

from __future__ import annotations

from typing import Any


class ObjectiveHooks:
    name: str

    def required_special_tokens(self) -> list[str]:
        """Special tokens the tokenizer must have (``data.prepare.special_tokens``); none by default."""
        return []

    def check_data(self, data: dict[str, Any]) -> None:
        """Raise ``ValueError`` (naming the field and the fix) when the prepared data cannot serve this
        objective. ``data`` holds the workload's facts (``FitPlan.data``: vocabulary and special tokens, or
        image size and classes)."""

    def fill_params(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Parameters the config leaves unset that come from the data; explicit ones that contradict it are
        a ``ValueError`` naming both. Returns the new parameter dict."""
        return params

    def set_step(self, step: int) -> None:
        """The global optimizer step before each training step (objectives with step-dependent behaviour)."""

    def reduce_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Derived metrics from the rank-averaged ones at a logging step (e.g. ratios of summed parts)."""
        return means

    def check_trainer(self, engine: str, zero_stage: int) -> None:
        """Raise ``ValueError`` (naming the allowed settings) when the objective cannot train on ``trainer.engine``
        with ``trainer.zero_stage``; every engine and stage by default."""

    def class_text_embeddings(self, model, device=None):
        """Text embeddings of every class caption (objectives with a text tower), else ``None``."""
        return None
