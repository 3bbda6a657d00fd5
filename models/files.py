"""File names of the export folders, torch-free (the driver, registry and storage use them without torch).

Decoder LM (:mod:`models.io`): weights, resolved config, tokenizer and its bos/eos/pad roles (Hugging Face's
``tokenizer_config.json`` keys). Vision encoder (:mod:`models.vit_io`): encoder weights, ViT config, image
processor, and the whole objective model for continuing the same objective.
"""

LM_WEIGHTS = "model.safetensors"
LM_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

ENCODER_WEIGHTS = "encoder.safetensors"
VIT_CONFIG = "vit_config.json"
PROCESSOR = "image_processor.json"
FULL_WEIGHTS = "vision_model.safetensors"
