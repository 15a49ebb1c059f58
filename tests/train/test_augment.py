"""Behaviour of the batch-wise joint image+mask augmentation."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from segflow.train.augment import AugmentConfig, augment_batch

GEOMETRY_OFF = {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0, "affine": 0.0}
COLOUR_OFF = {"brightness": 0.0, "contrast": 0.0, "hue": 0.0}


def cfg(**overrides: float | bool) -> AugmentConfig:
    """Everything off unless named, so each test exercises only what it names."""
    return AugmentConfig(**{**GEOMETRY_OFF, **COLOUR_OFF, **overrides})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blobs(b: int = 8, h: int = 32, w: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random blobs as masks; image channel 0 equals the mask, channels 1-2 are noise."""
    g = gen(seed)
    coarse = torch.rand(b, 1, max(h // 8, 1), max(w // 8, 1), generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    masks = (smooth > 0.5).float()
    images = torch.cat([masks, torch.rand(b, 2, h, w, generator=g)], dim=1)
    return images, masks


def assert_binary(masks: torch.Tensor) -> None:
    assert torch.all((masks == 0) | (masks == 1))


def test_flips_and_rot90_move_image_and_mask_together() -> None:
    images, masks = blobs()
    out_i, out_m = augment_batch(images, masks, cfg(hflip=0.5, vflip=0.5, rot90=0.5), gen(1))
    assert torch.equal(out_i[:, :1], out_m)
    assert not torch.equal(out_m, masks)  # something actually moved


def test_affine_moves_image_and_mask_together() -> None:
    images, masks = blobs()
    config = cfg(affine=1.0, shift=0.2, rotate=90.0, zoom=0.2)
    out_i, out_m = augment_batch(images, masks, config, gen(2))
    agreement = ((out_i[:, 0] > 0.5) == (out_m[:, 0] > 0.5)).float().mean(dim=(1, 2))
    assert torch.all(agreement > 0.97), agreement
    assert not torch.equal(out_m, masks)


def test_colour_changes_images_but_never_masks() -> None:
    images, masks = blobs()
    out_i, out_m = augment_batch(images, masks, cfg(brightness=0.2, contrast=0.2, hue=0.05), gen())
    assert torch.equal(out_m, masks)
    assert (out_i - images).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every sample changed
    assert out_i.min() >= 0 and out_i.max() <= 1


@pytest.mark.parametrize(
    "config",
    [
        AugmentConfig(),
        cfg(affine=1.0, shift=0.2, rotate=90.0, zoom=0.2),
        cfg(hflip=1.0, vflip=1.0, rot90=1.0),
        cfg(brightness=0.5, contrast=0.5, hue=0.5),
    ],
)
def test_masks_stay_exactly_binary_and_images_in_range(config: AugmentConfig) -> None:
    images, masks = blobs()
    out_i, out_m = augment_batch(images, masks, config, gen(3))
    assert_binary(out_m)
    assert out_i.min() >= 0 and out_i.max() <= 1
    assert out_i.shape == images.shape and out_m.shape == masks.shape


def test_hflip_always_equals_torch_flip() -> None:
    images, masks = blobs()
    out_i, out_m = augment_batch(images, masks, cfg(hflip=1.0), gen())
    assert torch.equal(out_i, torch.flip(images, dims=[-1]))
    assert torch.equal(out_m, torch.flip(masks, dims=[-1]))


def test_vflip_always_equals_torch_flip() -> None:
    images, masks = blobs()
    out_i, out_m = augment_batch(images, masks, cfg(vflip=1.0), gen())
    assert torch.equal(out_i, torch.flip(images, dims=[-2]))
    assert torch.equal(out_m, torch.flip(masks, dims=[-2]))


def test_rot90_always_gives_one_quarter_turn_shared_by_mask() -> None:
    images, masks = blobs(b=32)
    out_i, out_m = augment_batch(images, masks, cfg(rot90=1.0), gen(4))
    seen = set()
    for i in range(images.shape[0]):
        matches = [
            k for k in (1, 2, 3) if torch.equal(out_i[i], torch.rot90(images[i], k, dims=(-2, -1)))
        ]
        assert len(matches) == 1, f"sample {i}: matches {matches}"
        assert torch.equal(out_m[i], torch.rot90(masks[i], matches[0], dims=(-2, -1)))
        seen.add(matches[0])
    assert seen == {1, 2, 3}


def test_flips_then_rot90_compose_in_that_order() -> None:
    # Both flips are a half turn, so hflip+vflip then k in 1..3 quarter turns is k + 2 turns:
    # every sample is a 0, 1 or 3 quarter turn of its input and never a half turn.
    images, masks = blobs(b=32)
    out_i, out_m = augment_batch(images, masks, cfg(hflip=1.0, vflip=1.0, rot90=1.0), gen(4))
    seen = set()
    for i in range(images.shape[0]):
        turns = [k for k in range(4) if torch.equal(out_i[i], torch.rot90(images[i], k, (-2, -1)))]
        assert len(turns) == 1 and turns[0] != 2, f"sample {i}: {turns}"
        assert torch.equal(out_m[i], torch.rot90(masks[i], turns[0], (-2, -1)))
        seen.add(turns[0])
    assert seen == {0, 1, 3}


def mid_range_images(b: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Values in [0.3, 0.7] so mild colour jitter never reaches the clamp."""
    g = gen(11)
    images = 0.3 + 0.4 * torch.rand(b, 3, 16, 16, generator=g)
    return images, (torch.rand(b, 1, 16, 16, generator=g) > 0.5).float()


def test_brightness_adds_one_offset_per_image() -> None:
    images, masks = mid_range_images()
    out_i, _ = augment_batch(images, masks, cfg(brightness=0.2), gen())
    delta = (out_i - images).flatten(1)
    assert (delta - delta[:, :1]).abs().max() < 1e-5
    assert delta[:, 0].abs().max() <= 0.2 and delta[:, 0].abs().min() > 0


def test_contrast_scales_around_the_image_mean() -> None:
    images, masks = mid_range_images()
    out_i, _ = augment_batch(images, masks, cfg(contrast=0.2), gen())
    mean_in, mean_out = images.mean(dim=(1, 2, 3)), out_i.mean(dim=(1, 2, 3))
    assert (mean_out - mean_in).abs().max() < 1e-5
    spread_in = (images - mean_in.view(-1, 1, 1, 1)).flatten(1)
    spread_out = (out_i - mean_out.view(-1, 1, 1, 1)).flatten(1)
    factor = (spread_out * spread_in).sum(1) / (spread_in * spread_in).sum(1)
    assert (spread_out - factor[:, None] * spread_in).abs().max() < 1e-5
    assert torch.all((factor >= 0.8 - 1e-5) & (factor <= 1.2 + 1e-5))


def test_hue_keeps_luma_and_chroma_magnitude() -> None:
    images, masks = mid_range_images()
    out_i, _ = augment_batch(images, masks, cfg(hue=0.05), gen())
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    yiq_in = torch.einsum("ij,bjhw->bihw", to_yiq, images)
    yiq_out = torch.einsum("ij,bjhw->bihw", to_yiq, out_i)
    assert (yiq_out[:, 0] - yiq_in[:, 0]).abs().max() < 1e-5
    assert (yiq_out[:, 1:].norm(dim=1) - yiq_in[:, 1:].norm(dim=1)).abs().max() < 1e-5
    assert (out_i - images).abs().max() > 1e-3


def test_identity_affine_returns_input() -> None:
    images, masks = blobs()
    out_i, out_m = augment_batch(images, masks, cfg(affine=1.0, shift=0, rotate=0, zoom=0), gen())
    assert (out_i - images).abs().max() <= 1e-5
    assert torch.equal(out_m, masks)


def test_disabled_returns_inputs_unchanged() -> None:
    images, masks = blobs()
    out_i, out_m = augment_batch(images, masks, AugmentConfig(enabled=False), gen())
    assert torch.equal(out_i, images) and torch.equal(out_m, masks)


def test_same_seed_same_output_different_seed_different() -> None:
    images, masks = blobs()
    config = AugmentConfig()
    a = augment_batch(images, masks, config, gen(7))
    b = augment_batch(images, masks, config, gen(7))
    c = augment_batch(images, masks, config, gen(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_inputs_are_not_modified() -> None:
    images, masks = blobs()
    before = images.clone(), masks.clone()
    augment_batch(images, masks, AugmentConfig(), gen())
    assert torch.equal(images, before[0]) and torch.equal(masks, before[1])


def test_hflip_half_the_time() -> None:
    g = gen(5)
    images = torch.rand(1000, 3, 4, 4, generator=g)
    masks = (torch.rand(1000, 1, 4, 4, generator=g) > 0.5).float()
    out_i, _ = augment_batch(images, masks, cfg(hflip=0.5), gen(6))
    flipped = (out_i == torch.flip(images, dims=[-1])).flatten(1).all(dim=1)
    kept = (out_i == images).flatten(1).all(dim=1)
    assert torch.all(flipped ^ kept)  # random pixels: never both, always one
    assert 0.45 <= flipped.float().mean().item() <= 0.55


def test_rot90_skipped_when_not_square() -> None:
    images, masks = blobs(h=16, w=32)
    out_i, out_m = augment_batch(images, masks, cfg(rot90=1.0), gen())
    assert torch.equal(out_i, images) and torch.equal(out_m, masks)


def test_non_square_full_augmentation_keeps_shape_and_agreement() -> None:
    images, masks = blobs(h=16, w=32)
    out_i, out_m = augment_batch(images, masks, cfg(hflip=0.5, rot90=1.0, affine=1.0), gen())
    assert out_i.shape == images.shape and out_m.shape == masks.shape
    assert_binary(out_m)
    agreement = ((out_i[:, 0] > 0.5) == (out_m[:, 0] > 0.5)).float().mean(dim=(1, 2))
    assert torch.all(agreement > 0.95), agreement


def test_empty_batch() -> None:
    images, masks = torch.zeros(0, 3, 8, 8), torch.zeros(0, 1, 8, 8)
    out_i, out_m = augment_batch(images, masks, AugmentConfig(), gen())
    assert out_i.shape == images.shape and out_m.shape == masks.shape


@pytest.mark.parametrize(
    ("images", "masks", "fragment"),
    [
        (torch.zeros(2, 8, 8), torch.zeros(2, 1, 8, 8), "(2, 8, 8)"),
        (torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), "(B, 3, H, W)"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8), "(2, 8, 8)"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2, 1, 8, 8), "torch.uint8"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.bool), "torch.bool"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(3, 1, 8, 8), "(3, 1, 8, 8)"),
        (torch.zeros(2, 3, 8, 8), torch.zeros(2, 1, 8, 9), "(2, 1, 8, 9)"),
    ],
)
def test_bad_input_raises_value_error(
    images: torch.Tensor, masks: torch.Tensor, fragment: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        augment_batch(images, masks, AugmentConfig(), gen())


def test_bad_generator_raises_value_error() -> None:
    images, masks = blobs()
    with pytest.raises(ValueError, match="generator"):
        augment_batch(images, masks, AugmentConfig(), 0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides", [{"hflip": 1.5}, {"zoom": 1.0}, {"rotate": -1.0}, {"shift": float("nan")}]
)
def test_bad_config_raises_value_error(overrides: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(overrides))):
        AugmentConfig(**overrides)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu_for_same_seed() -> None:
    images, masks = blobs()
    config = AugmentConfig()
    cpu_i, cpu_m = augment_batch(images, masks, config, gen(9))
    gpu_i, gpu_m = augment_batch(images.cuda(), masks.cuda(), config, gen(9))
    assert gpu_i.device.type == "cuda"
    assert (gpu_i.cpu() - cpu_i).abs().max() <= 1e-4
    # Nearest sampling may round a grid point on an exact pixel boundary differently.
    assert (gpu_m.cpu() != cpu_m).float().mean() < 1e-3
