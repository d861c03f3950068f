"""FrozenEncoder on tiny random SigLIP, DINOv2 and ViT checkpoints and on plain nn.Modules; patch tokens.

Each checkpoint is written with save_pretrained next to a hand-written preprocessor_config.json
whose constants differ from every library default, so tests can tell whether they were read. The
independent references are transformers' own image processors (PIL backends) and direct calls of
the models.
"""

from __future__ import annotations

import copy
import json
from typing import get_args

import numpy as np
import pytest
import skimage.data
import torch
import transformers
from conftest import TINY_CLIP_CONFIG, TINY_CLIP_MEAN, TINY_CLIP_STD
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    Dinov2Config,
    Dinov2Model,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import (
    SiglipImageProcessorPil,
)
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

import travel_loss as package
from travel_loss import FrozenCLIPEncoder, FrozenEncoder, TravelLoss, hub, travel_loss
from travel_loss.encoder import OPENAI_CLIP_MEAN, CheckpointNotFoundError, Features
from travel_loss.testing import check_embedder

PHOTOS = ("astronaut", "coffee", "chelsea")  # 512x512, 400x600, 300x451: both orientations
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=8)
MEAN, STD = (0.45, 0.5, 0.55), (0.21, 0.22, 0.23)  # nobody's defaults

SIGLIP_PROCESSOR = {  # SigLIP's layout: a square resize, bilinear, no crop
    "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
    "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": list(MEAN), "image_std": list(STD),
}  # fmt: skip
DINOV2_PROCESSOR = {  # DINOv2's BitImageProcessor layout (256 -> 224 scaled down to 40 -> 32)
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 40},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": 32, "width": 32}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD),
    "do_convert_rgb": True,
}  # fmt: skip
VIT_PROCESSOR_LEGACY = {  # legacy int size: (32, 32) for ViT's processor
    "feature_extractor_type": "ViTFeatureExtractor", "do_resize": True, "size": 32, "resample": 2,
    "do_normalize": True, "image_mean": list(MEAN), "image_std": list(STD),
}  # fmt: skip


def _save(folder, model, processor: dict):
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return folder


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = SiglipVisionModel(SiglipVisionConfig(image_size=32, intermediate_size=64, **TINY))
    return _save(tmp_path_factory.mktemp("siglip"), model, SIGLIP_PROCESSOR)


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    # config.image_size 48 differs from the processor's 32 crop, as DINOv2's 518 from its 224.
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(image_size=48, mlp_ratio=2, **TINY))
    return _save(tmp_path_factory.mktemp("dinov2"), model, DINOV2_PROCESSOR)


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=32, intermediate_size=64, **TINY))
    return _save(tmp_path_factory.mktemp("vit"), model, VIT_PROCESSOR_LEGACY)


FAMILIES = {
    "siglip": ("siglip_dir", SiglipImageProcessorPil, SiglipVisionModel),
    "dinov2": ("dinov2_dir", BitImageProcessorPil, Dinov2Model),
    "vit": ("vit_dir", ViTImageProcessorPil, ViTModel),
}


def as_input(image_hwc: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image_hwc)).permute(2, 0, 1)[None].double() / 255
    return (2 * x - 1).float()


def images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def reference_output(model, pixel_values, family, features):
    with torch.no_grad():
        if family == "siglip":
            out = model(pixel_values=pixel_values)
            return out.pooler_output if features == "pooled" else out.last_hidden_state.mean(1)
        hidden = model(pixel_values=pixel_values).last_hidden_state
        return hidden[:, 0] if features == "cls" else hidden[:, 1:].mean(1)


# ------------------------------------------------------------------------------------------
# Loading: family, processor config, embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_size_mean_and_std_from_the_checkpoints_processor_config(request, family):
    encoder = FrozenEncoder(request.getfixturevalue(FAMILIES[family][0]))
    assert encoder.family == family and encoder.image_size == 32
    assert encoder.mean == pytest.approx(MEAN) and encoder.std == pytest.approx(STD)
    assert encoder.embedding_dim == 32


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("family", FAMILIES)
def test_resize_matches_the_families_image_processor_on_photos(request, family, name):
    fixture, processor_class, _ = FAMILIES[family]
    folder = request.getfixturevalue(fixture)
    encoder, processor = FrozenEncoder(folder, crop="resize"), processor_class.from_pretrained(folder)
    image = getattr(skimage.data, name)()
    expected = torch.from_numpy(np.asarray(processor(image, return_tensors="np")["pixel_values"]))
    got = encoder.preprocess(as_input(image))
    assert got.shape == expected.shape == (1, 3, 32, 32)
    assert (got - expected).abs().mean() <= 0.01


@pytest.mark.parametrize(
    "family, features", [("siglip", "pooled"), ("siglip", "mean"), ("dinov2", "cls"), ("dinov2", "mean"),
                         ("vit", "cls"), ("vit", "mean")]
)  # fmt: skip
def test_embeddings_are_the_models_own_features(request, family, features):
    fixture, _, model_class = FAMILIES[family]
    folder = request.getfixturevalue(fixture)
    encoder = FrozenEncoder(folder, features=features)
    reference = model_class.from_pretrained(folder).eval()
    x = images(3, 40, 40)
    pixel_values = encoder.preprocess(x)
    torch.testing.assert_close(encoder(x), reference_output(reference, pixel_values, family, features))


def test_default_features_per_family(siglip_dir, dinov2_dir, vit_dir, tiny_clip_dir):
    assert [FrozenEncoder(d).features for d in (siglip_dir, dinov2_dir, vit_dir, tiny_clip_dir)] == [
        "pooled",
        "cls",
        "cls",
        "pooled",
    ]
    with pytest.raises(ValueError, match="features: expected one of 'cls', 'mean' for a dinov2 model, got 'pooled'"):
        FrozenEncoder(dinov2_dir, features="pooled")


def test_clip_checkpoint_through_frozen_encoder_equals_frozen_clip_encoder(tiny_clip_dir):
    x = images(2, 40, 44)
    for features in ("pooled", "projected"):
        general = FrozenEncoder(tiny_clip_dir, features=features, crop="resize")
        clip = FrozenCLIPEncoder(tiny_clip_dir, features=features, crop="resize")
        assert general.family == "clip" and isinstance(clip, FrozenEncoder)
        torch.testing.assert_close(general(x), clip(x))
    assert FrozenEncoder(tiny_clip_dir).mean == pytest.approx(TINY_CLIP_MEAN)
    assert FrozenEncoder(tiny_clip_dir).std == pytest.approx(TINY_CLIP_STD)


def test_dinov2_legacy_int_keys_mean_shortest_edge_and_crop(tmp_path):
    torch.manual_seed(0)
    legacy = dict(DINOV2_PROCESSOR, size=40, crop_size=32)
    folder = _save(tmp_path, Dinov2Model(Dinov2Config(image_size=48, mlp_ratio=2, **TINY)), legacy)
    encoder = FrozenEncoder(folder, crop="resize")
    x = images(1, 40, 50)  # shortest edge already 40: only the central 32 x 32 crop
    expected = ((x[..., 4:36, 9:41] + 1) / 2 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(encoder.preprocess(x), expected)


def test_instances_need_mean_and_std_and_are_frozen_in_place():
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(image_size=32, mlp_ratio=2, **TINY)).train()
    with pytest.raises(ValueError, match="mean, std: required for a dinov2 model instance"):
        FrozenEncoder(model)
    encoder = FrozenEncoder(model, mean=MEAN, std=STD)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert encoder.image_size == 32 and encoder.family == "dinov2"


class TinyConvNet(nn.Module):
    """A stand-in for a timm / open_clip tower: (N, 3, S, S) -> (N, 4, 2, 2) features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 5, stride=4)
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, x):
        return self.pool(torch.tanh(self.conv(x)))


def test_plain_module_needs_explicit_mean_std_and_image_size():
    with pytest.raises(ValueError, match=r"mean, std, image_size: required for a plain nn.Module \(TinyConvNet\)"):
        FrozenEncoder(TinyConvNet())
    with pytest.raises(ValueError, match=r"^image_size: required"):
        FrozenEncoder(TinyConvNet(), mean=MEAN, std=STD)
    net = TinyConvNet()
    encoder = FrozenEncoder(net, mean=MEAN, std=STD, image_size=24, crop="full")
    x = images(3, 30, 40)
    expected = net(encoder.preprocess(x)).flatten(1)
    torch.testing.assert_close(encoder(x), expected)
    assert encoder(x).shape == (3, 16) and encoder.family == "module"
    parent = nn.Sequential(nn.Conv2d(3, 3, 1), encoder)
    assert set(parent.state_dict()) == {"0.weight", "0.bias"} and len(list(parent.parameters())) == 2
    check_embedder(encoder, image_shape=(3, 30, 40))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_passes_check_embedder_and_stays_frozen_in_a_parent(request, family):
    encoder = FrozenEncoder(request.getfixturevalue(FAMILIES[family][0]))
    check_embedder(encoder, image_shape=(3, 40, 40))
    parent = nn.Sequential(nn.Conv2d(3, 3, 1), encoder).train()
    assert not encoder.training and not any(m.training for m in encoder.model.modules())
    assert set(parent.state_dict()) == {"0.weight", "0.bias"}
    parent.double()
    assert all(p.dtype == torch.float64 for p in encoder.model.parameters())


def test_siglip_other_image_size_interpolates_position_embeddings(siglip_dir):
    encoder = FrozenEncoder(siglip_dir, image_size=48, crop="full")
    x = images(2, 40, 56)
    pixel_values = encoder.preprocess(x)
    with torch.no_grad():
        expected = encoder.model(pixel_values=pixel_values, interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(encoder(x), expected)


# ------------------------------------------------------------------------------------------
# Bad input


def test_unsupported_checkpoints_are_refused_with_the_way_out(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ValueError, match="NaFlex SigLIP 2.*fixed-resolution SigLIP 2 checkpoint"):
        FrozenEncoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'; supported: .*pass an nn.Module"):
        FrozenEncoder(tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="not found locally"):
        FrozenEncoder(tmp_path / "missing")
    with pytest.raises(TypeError, match="model: expected a hub id, a folder path or an nn.Module, got int"):
        FrozenEncoder(3)  # type: ignore[arg-type]


def test_checkpoint_without_processor_config_needs_mean_and_std(tmp_path):
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(image_size=32, intermediate_size=64, **TINY)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mean, std: .* has no preprocessor_config.json"):
        FrozenEncoder(tmp_path)
    assert FrozenEncoder(tmp_path, mean=0.5, std=0.5).image_size == 32


# ------------------------------------------------------------------------------------------
# Silence, copies, replication


@pytest.mark.parametrize("family", [*FAMILIES, "clip"])
def test_loading_prints_nothing_unless_verbose_and_restores_transformers_settings(request, capfd, family):
    from transformers.utils import logging as hf_logging

    folder = request.getfixturevalue("tiny_clip_dir" if family == "clip" else FAMILIES[family][0])
    before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    capfd.readouterr()
    FrozenEncoder(folder)
    FrozenCLIPEncoder(folder) if family == "clip" else None
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before
    FrozenEncoder(folder, verbose=True)
    out, err = capfd.readouterr()
    assert "Loading weights" in out + err  # transformers' progress bar, shown when asked for


def test_deepcopy_gives_an_independent_frozen_copy(siglip_dir):
    encoder = FrozenEncoder(siglip_dir)
    parent = nn.Sequential(nn.Conv2d(3, 3, 1), encoder)
    copied = copy.deepcopy(parent)
    twin = copied[1]
    assert twin.model is not encoder.model
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(twin.model.parameters(), encoder.model.parameters()))
    x = images(2, 32, 32)
    torch.testing.assert_close(twin(x), encoder(x))
    assert set(copied.state_dict()) == {"0.weight", "0.bias"}
    assert not any(p.requires_grad for p in twin.model.parameters())
    twin.double()
    assert next(encoder.model.parameters()).dtype == torch.float32


def test_data_parallel_replica_runs_weights_on_its_inputs_device(siglip_dir):
    # nn.DataParallel builds replicas with _replicate_for_data_parallel and calls each on its
    # device's inputs; the meta device stands in for a second GPU on a CPU-only machine.
    encoder = FrozenEncoder(siglip_dir, check_range=False)
    x = images(2, 32, 32)
    torch.testing.assert_close(encoder._replicate_for_data_parallel()(x), encoder(x))  # same device
    replica = encoder._replicate_for_data_parallel()
    for name, buffer in replica._buffers.items():  # what replicate() does to registered buffers
        replica._buffers[name] = buffer.to("meta")
    on_meta = replica(x.to("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 32)
    copies = list(encoder._device_copies.values())
    assert len(copies) == 1 and all(p.device.type == "meta" for p in copies[0].parameters())
    replica(x.to("meta"))
    assert next(iter(encoder._device_copies.values())) is copies[0]  # cached, not copied per call
    assert all(p.device.type == "cpu" for p in encoder.model.parameters())


# ------------------------------------------------------------------------------------------
# TravelLoss with an encoder


def test_travel_loss_module_with_an_encoder_takes_images(siglip_dir):
    encoder = FrozenEncoder(siglip_dir)
    loss_fn = TravelLoss(encoder=encoder)
    x = images(4, 32, 32, seed=0)
    weight = torch.tensor(0.9, requires_grad=True)
    fake = torch.tanh(weight * x.flip(-1))
    loss = loss_fn(x, fake)
    with torch.no_grad():
        emb_src = encoder(x)
    torch.testing.assert_close(loss, travel_loss(emb_src, encoder(fake)))
    loss.backward()
    assert weight.grad is not None and weight.grad != 0
    assert loss_fn.state_dict() == {} and list(loss_fn.parameters()) == []
    with pytest.raises(ValueError, match="x: expected a batch of at least 2 images.*batch size 1.*TravelQueue"):
        loss_fn(x[:1], fake[:1])
    with pytest.raises(ValueError, match="x, fake: expected one translation per source image"):
        loss_fn(x[:3], fake[:2])
    with pytest.raises(TypeError, match="encoder: expected None or an nn.Module"):
        TravelLoss(encoder="clip")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# The family table: every row, every model type, through the one loading path

MODEL_TYPES = [(family.name, model_type) for family in hub.FAMILIES.values() for model_type in family.model_types]
REGISTERS = {"dinov2_with_registers": 4, "dinov3_vit": 2}  # register tokens the "mean" readout skips


def _tiny_checkpoint(folder, model_type: str, class_name: str):
    """A tiny checkpoint whose config.json has ``model_type``: for ``clip`` and ``siglip`` a full
    image-text model (as the hub's checkpoints are), else saved by the class its row loads."""
    torch.manual_seed(0)
    vision = dict(image_size=32, intermediate_size=64, **TINY)
    if model_type in ("clip", "siglip"):
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        vision = TINY_CLIP_CONFIG if model_type == "clip" else vision
        config = AutoConfig.for_model(model_type, text_config=text, vision_config=vision, projection_dim=16)
        model = AutoModel.from_config(config)
    else:
        registers = REGISTERS.get(model_type, 0)
        config = AutoConfig.for_model(model_type, mlp_ratio=2, num_register_tokens=registers, **vision)
        model = getattr(transformers, class_name)(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _readout_by_hand(model, readout: str, pixel_values):
    """The embedding a readout names, computed directly on the transformers model (CLIP and SigLIP
    wrap their tower as .vision_model); the patch tokens are the last (32 / 8)^2 = 16 tokens."""
    with torch.no_grad():
        output = getattr(model, "vision_model", model)(pixel_values=pixel_values)
        if readout == "pooler":
            return output.pooler_output
        if readout == "projection":
            return model.visual_projection(output.pooler_output)
        if readout == "first_token":
            return output.last_hidden_state[:, 0]
        assert readout == "patch_mean"
        return output.last_hidden_state[:, -16:].mean(dim=1)


@pytest.mark.parametrize("family_name, model_type", MODEL_TYPES)
def test_every_model_type_of_every_family_loads_through_one_path(tmp_path, family_name, model_type):
    family = hub.FAMILIES[family_name]
    class_name = family.model_types[model_type]
    folder = _tiny_checkpoint(tmp_path, model_type, class_name)
    checkpoint = hub.find_checkpoint(str(folder), {})
    assert checkpoint.family is family and checkpoint.model_class == class_name
    backbone, processor, complete = checkpoint.load()
    assert type(backbone).__name__ == class_name and processor == {} and complete
    reference = getattr(transformers, class_name).from_pretrained(folder).eval()
    x = images(2, 40, 40)
    for features, readout in family.features.items():
        encoder = FrozenEncoder(folder, features=features, mean=MEAN, std=STD)
        assert (encoder.family, encoder.features, encoder.image_size) == (family_name, features, 32)
        expected = _readout_by_hand(reference, readout, encoder.preprocess(x))
        torch.testing.assert_close(encoder(x), expected)
        assert encoder.embedding_dim == expected.shape[1]


def test_the_clip_row_is_what_frozen_clip_encoder_takes():
    assert get_args(Features) == tuple(hub.FAMILIES["clip"].features)
    assert FrozenCLIPEncoder._only_family is hub.FAMILIES["clip"] and FrozenEncoder._only_family is None
    # Defined once, in travel_loss.hub; travel_loss and travel_loss.encoder re-export them.
    assert package.CheckpointNotFoundError is CheckpointNotFoundError is hub.CheckpointNotFoundError
    assert OPENAI_CLIP_MEAN is hub.OPENAI_CLIP_MEAN


# ------------------------------------------------------------------------------------------
# Patch tokens: one forward for the embedding and the structure loss's spatial features


@pytest.mark.parametrize("family_name, model_type", MODEL_TYPES)
def test_forward_with_tokens_gives_the_embedding_and_the_patch_tokens_of_one_pass(tmp_path, family_name, model_type):
    family = hub.FAMILIES[family_name]
    folder = _tiny_checkpoint(tmp_path, model_type, family.model_types[model_type])
    reference = getattr(transformers, family.model_types[model_type]).from_pretrained(folder).eval()
    tower = getattr(reference, "vision_model", reference)
    encoder = FrozenEncoder(folder, mean=MEAN, std=STD)
    x = images(2, 40, 40)
    patch_size = int(tower.config.patch_size)
    grid = (32 // patch_size, 32 // patch_size)
    calls = []
    handle = encoder.model.get_submodule(encoder._tower_path).register_forward_hook(lambda *args: calls.append(1))
    embeddings, tokens = encoder.forward_with_tokens(x)
    handle.remove()
    assert encoder.token_grid == grid and len(calls) == 1  # one pass of the tower
    torch.testing.assert_close(embeddings, encoder(x), rtol=0, atol=0)
    with torch.no_grad():
        output = tower(pixel_values=encoder.preprocess(x), output_hidden_states=True)
    leading = output.last_hidden_state.shape[1] - grid[0] * grid[1]  # CLS and register tokens
    assert leading == (0 if family_name == "siglip" else 1 + REGISTERS.get(model_type, 0))
    assert tokens.shape == (2, grid[0] * grid[1], output.last_hidden_state.shape[2])
    torch.testing.assert_close(tokens, output.last_hidden_state[:, leading:])
    _, middle = encoder.forward_with_tokens(x, layer=1)
    torch.testing.assert_close(middle, output.hidden_states[1][:, leading:])
    _, last_block = encoder.forward_with_tokens(x, layer=-1)
    torch.testing.assert_close(last_block, output.hidden_states[-1][:, leading:])
    with pytest.raises(ValueError, match="layer: expected an index into the 3 hidden_states"):
        encoder.forward_with_tokens(x, layer=3)


def test_tokens_carry_gradient_to_the_images_and_feed_the_structure_loss(siglip_dir):
    encoder = FrozenEncoder(siglip_dir)
    x = images(2, 32, 32)
    fake = images(2, 32, 32, seed=1).requires_grad_(True)
    with torch.no_grad():
        _, tokens_src = encoder.forward_with_tokens(x)
    _, tokens_gen = encoder.forward_with_tokens(fake)
    loss = package.self_similarity_loss(tokens_src, tokens_gen, grid=encoder.token_grid, window=3)
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert encoder.state_dict() == {} and not any(p.requires_grad for p in encoder.model.parameters())


class TinyConvNetWithTokens(TinyConvNet):
    def tokens(self, x):
        return self.conv(x)  # the conv's (N, C, H, W) map


def test_plain_modules_give_tokens_only_through_their_own_method():
    options = dict(mean=MEAN, std=STD, image_size=16)
    x = images(2, 16, 16)
    with pytest.raises(ValueError, match="model: the plain module TinyConvNet gives no spatial tokens"):
        FrozenEncoder(TinyConvNet(), **options).forward_with_tokens(x)
    module = TinyConvNetWithTokens()
    encoder = FrozenEncoder(module, **options)
    embeddings, maps = encoder.forward_with_tokens(x)
    torch.testing.assert_close(embeddings, encoder(x))
    torch.testing.assert_close(maps, module.tokens(encoder.preprocess(x)))
    assert encoder.token_grid is None
    with pytest.raises(ValueError, match="layer: a plain module"):
        encoder.forward_with_tokens(x, layer=1)
