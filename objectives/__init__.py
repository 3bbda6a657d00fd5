"""Pre-training objectives, chosen by name: ``objectives.get(name, **params)``.

| name | paper |
|---|---|
| ``causal_lm`` | next-token prediction (GPT), z-loss of PaLM (arXiv 2204.02311) |
| ``mlm`` | BERT masked LM, 15% with 80/10/10 (arXiv 1810.04805) |
| ``span_corruption`` | T5 span corruption with sentinels (arXiv 1910.10683) |
| ``ul2`` | UL2 Mixture-of-Denoisers R/X/S with mode tokens (arXiv 2205.05131) |
| ``self_distillation`` | self-distillation for further pre-training (arXiv 2210.02871) |

``objectives.functional`` holds the losses as tensor functions, including the classification losses
``focal`` (arXiv 1708.02002) and ``spherical_z`` (arXiv 1604.08859).
"""

from typing import Any

from objectives import causal_lm as _causal_lm  # noqa: F401  (registers)
from objectives import mlm as _mlm  # noqa: F401
from objectives import self_distillation as _self_distillation  # noqa: F401
from objectives import span_corruption as _span_corruption  # noqa: F401
from objectives import ul2 as _ul2  # noqa: F401
from objectives.registry import Objective, available, get, params_model, register


def special_tokens_for(name: str, **params: Any) -> list[str]:
    """The extra special tokens objective ``name`` needs in the tokenizer (``data.prepare.special_tokens``).

    EOS and PAD are never listed: every prepared tokenizer has an EOS (``data.prepare.eos_token``) and
    a pad id (its pad token, else EOS), which the objectives get as ids from the manifest.
    """
    from objectives.special_tokens import EOS_TOKEN, PAD_TOKEN

    obj = get(name, **params)
    return [t for t in obj.required_special_tokens() if t not in (EOS_TOKEN, PAD_TOKEN)]


__all__ = ["Objective", "available", "get", "params_model", "register", "special_tokens_for"]
