"""Export format of vision runs (models/vit_io.py): round trip, strict keys, the image processor."""

from __future__ import annotations

import pytest
import torch

from models.vit_io import (
    FULL_WEIGHTS,
    ImageProcessor,
    is_vision_export,
    load_embedder,
    load_encoder,
    load_full_state,
    load_processor,
    save_vision,
)
from objectives.vision import build_model


@pytest.fixture()
def simclr_model():
    torch.manual_seed(0)
    return build_model("simclr", None, "debug")


def test_round_trip_encoder_and_full_model(simclr_model, tmp_path):
    proc = ImageProcessor(image_size=32, channels=3, mean=0.5, std=0.25, class_names=["a", "b"], objective="simclr")
    save_vision(simclr_model.state_dict(), simclr_model.vit_cfg, proc, tmp_path)
    assert is_vision_export(tmp_path) and (tmp_path / FULL_WEIGHTS).is_file()
    encoder, cfg = load_encoder(tmp_path)
    assert cfg == simclr_model.vit_cfg
    for k, v in simclr_model.encoder.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[k], v)
    full = load_full_state(tmp_path)
    assert set(full) == set(simclr_model.state_dict())  # projector included
    assert load_processor(tmp_path) == proc

    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    emb = load_embedder(tmp_path)(images)
    simclr_model.eval()
    with torch.no_grad():
        ref = simclr_model.encoder((images.float() / 255 - 0.5) / 0.25, pool=True)
    torch.testing.assert_close(emb, ref)


def test_save_refuses_weights_of_another_encoder(simclr_model, tmp_path):
    state = {k: v for k, v in simclr_model.state_dict().items() if not k.startswith("encoder.blocks.1.")}
    proc = ImageProcessor(image_size=32, channels=3)
    with pytest.raises(ValueError, match="missing"):
        save_vision(state, simclr_model.vit_cfg, proc, tmp_path)
    assert not is_vision_export(tmp_path)


def test_processor_normalises_and_resizes():
    proc = ImageProcessor(image_size=8, channels=1, mean=0.5, std=0.5)
    x = proc(torch.full((2, 1, 16, 16), 255, dtype=torch.uint8))
    assert x.shape == (2, 1, 8, 8)
    torch.testing.assert_close(x, torch.ones(2, 1, 8, 8))
    assert float(proc(torch.zeros(1, 1, 8, 8, dtype=torch.uint8)).max()) == -1.0
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        proc(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_load_encoder_names_a_non_vision_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="vit_config.json"):
        load_encoder(tmp_path)
