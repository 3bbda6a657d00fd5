"""Vision pre-training objectives, registered in the objective registry on import (README, "Vision and
contrastive pre-training").

| name | paper |
|---|---|
| ``mae`` | masked autoencoder (He et al., arXiv 2111.06377) |
| ``hpm`` | hard patches mining (Wang et al., arXiv 2304.05919) |
| ``simclr`` | NT-Xent on two views (Chen et al., arXiv 2002.05709) |
| ``amcl`` | adaptive multi-head contrastive learning (Wang et al., arXiv 2310.05615) |
| ``barlow_twins`` | redundancy reduction (Zbontar et al., arXiv 2103.03230) |
| ``mixed_barlow_twins`` | Barlow Twins + mixup regulariser (Bandara et al., arXiv 2312.02151) |
| ``clip`` | image-caption contrastive learning (Radford et al., arXiv 2103.00020) |

Use::

    import objectives, objectives.vision
    obj = objectives.get("mae", mask_ratio=0.75).bind(vit_cfg)   # bind: the patch grid (masking needs it)
    model = objectives.vision.build_model("mae", obj.params, vit_cfg)   # one nn.Module, parts as attributes
    prepared = obj.prepare({"images": uint8 (B, C, H, W), "labels": int64 (B,)}, generator)
    loss, metrics = obj.loss(model, prepared)
    emb = obj.embed(model, images_uint8)                        # (B, D) for k-NN / NCM probes

:mod:`objectives.vision.model` lists the parts of each objective's model; :mod:`objectives.vision.functional`
holds the losses as tensor functions.
"""

from objectives.vision import clip as _clip  # noqa: F401  (registers)
from objectives.vision import contrastive as _contrastive  # noqa: F401
from objectives.vision import masked as _masked  # noqa: F401
from objectives.vision.base import VisionObjective, registered_vision_objectives
from objectives.vision.model import VisionModel, build_model

VISION_OBJECTIVES = registered_vision_objectives()  # every vision objective is registered by the imports above

__all__ = ["VISION_OBJECTIVES", "VisionModel", "VisionObjective", "build_model", "registered_vision_objectives"]
