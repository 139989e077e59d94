"""Hugging Face folders: tiny random-init ViT, ViTMAE, DINOv2 (with and without registers), CLIP
vision (alone and inside a full CLIPModel) and SigLIP vision models saved with ``save_pretrained``
and their image processors, converted, and compared with the model's own ``last_hidden_state``
(cls and register tokens dropped; ViTMAE unmasked and put back in image order with its own
``ids_restore``) at square and non-square sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gridfeats.config import get_cfg

from .helpers import convert, grids_unresized, read_rgb, refusal, relative_error, write_pngs

transformers = pytest.importorskip("transformers")

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=64,
    patch_size=16,
)
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _specs():
    t = transformers
    dino = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
    )
    mae = dict(
        decoder_hidden_size=16,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    clip_text = dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=1,
    )
    return {
        # name: (class saved, config, processor, class run, prefix tokens)
        "vit": (t.ViTModel, t.ViTConfig(**SMALL), t.ViTImageProcessor(), "ViTModel", 1),
        "vit_mae": (
            t.ViTMAEForPreTraining,
            t.ViTMAEConfig(**SMALL, **mae),
            t.ViTImageProcessor(image_mean=MEAN, image_std=STD),
            "ViTMAEModel",
            1,
        ),
        "dinov2": (
            t.Dinov2Model,
            t.Dinov2Config(**dino),
            t.BitImageProcessor(image_mean=MEAN, image_std=STD),
            "Dinov2Model",
            1,
        ),
        "dinov2_registers": (
            t.Dinov2WithRegistersModel,
            t.Dinov2WithRegistersConfig(**dino, num_register_tokens=4),
            t.BitImageProcessor(image_mean=MEAN, image_std=STD),
            "Dinov2WithRegistersModel",
            5,
        ),
        "clip_vision": (
            t.CLIPVisionModel,
            t.CLIPVisionConfig(**SMALL),
            t.CLIPImageProcessor(),
            "CLIPVisionModel",
            1,
        ),
        "clip_full": (
            t.CLIPModel,
            t.CLIPConfig(text_config=clip_text, vision_config=SMALL, projection_dim=16),
            t.CLIPImageProcessor(),
            "CLIPVisionModel",
            1,
        ),
        "siglip_vision": (
            t.SiglipVisionModel,
            t.SiglipVisionConfig(**SMALL),
            t.SiglipImageProcessor(),
            "SiglipVisionModel",
            0,
        ),
    }


SPECS = _specs()


def _own_patch_tokens(model, name, pixel_values, prefix):
    """The saved model's own forward: ``last_hidden_state`` minus cls / registers, as a map."""
    with torch.no_grad():
        if name == "vit_mae":
            model.config.mask_ratio = 0.0
            out = model.vit(pixel_values=pixel_values, interpolate_pos_encoding=True)
            tokens = out.last_hidden_state[:, 1:]
            restore = out.ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
            tokens = torch.gather(tokens, 1, restore)  # shuffled -> image order
        else:
            tower = model.vision_model if name == "clip_full" else model
            kwargs = {} if name.startswith("dinov2") else {"interpolate_pos_encoding": True}
            tokens = tower(pixel_values=pixel_values, **kwargs).last_hidden_state[:, prefix:]
    p = model.config.vision_config.patch_size if name == "clip_full" else model.config.patch_size
    h, w = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
    return tokens[0].transpose(0, 1).reshape(-1, h, w)


def _pixel_values(rgb, processor):
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().unsqueeze(0) / 255
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("name", list(SPECS))
def test_hf_grid_equals_models_own_patch_tokens(name, tmp_path, capsys, one_thread):
    saved_cls, config, processor, run_as, prefix = SPECS[name]
    torch.manual_seed(3)
    model = saved_cls(config).eval()
    folder = tmp_path / name
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    out = convert(folder, tmp_path / f"{name}.pth", capsys=capsys)
    assert f"run as {run_as}" in out and "-> format hf" in out
    cfg = get_cfg(tmp_path / f"{name}.yaml")
    assert cfg.MODEL.BACKBONE.NAME == "build_hf_backbone" and cfg.MODEL.HF.MODEL_CLASS == run_as
    assert cfg.MODEL.PIXEL_MEAN == pytest.approx([255 * m for m in processor.image_mean])
    assert cfg.MODEL.PIXEL_STD == pytest.approx([255 * s for s in processor.image_std])
    assert cfg.MODEL.HF.CONFIG.hidden_size == 32
    p = 14 if name.startswith("dinov2") else 16
    sizes = [(4 * p, 4 * p), (4 * p, 6 * p), (3 * p, 5 * p)]
    pngs = write_pngs(tmp_path, sizes)
    for png, got in zip(pngs, grids_unresized(tmp_path / f"{name}.pth", pngs)):
        want = _own_patch_tokens(model, name, _pixel_values(read_rgb(png), processor), prefix)
        assert relative_error(got, want) < 1e-4, png.name


def test_hf_folder_without_image_processor_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    transformers.ViTModel(transformers.ViTConfig(**SMALL)).save_pretrained(tmp_path / "vit")
    err = refusal(tmp_path / "vit", tmp_path / "vit.pth", capsys=capsys)
    assert "preprocessor_config.json" in err
