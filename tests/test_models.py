import math

import pytest
import torch

from engine.config import load_config
from engine.models.backbone import PRESETS, build_backbone
from engine.models.swav import build_swav_model

# Trunk parameter counts from ../shared/SEER_RECIPE.md (millions).
SEER_TRUNK_PARAMS = {"regnety_32gf": 141.3, "regnety_64gf": 276.5, "regnety_128gf": 637.4,
                     "regnety_256gf": 1272.2, "seer_10b": 9323.9}


@pytest.mark.parametrize("name", sorted(SEER_TRUNK_PARAMS))
def test_seer_presets_match_published_sizes_on_meta(name):
    backbone = build_backbone(name, device="meta")
    params = sum(p.numel() for p in backbone.parameters()) / 1e6
    assert all(p.is_meta for p in backbone.parameters())
    assert params == pytest.approx(SEER_TRUNK_PARAMS[name], rel=0.005)


def test_every_preset_is_tested():
    assert set(PRESETS) == set(SEER_TRUNK_PARAMS) | {"regnety_micro", "regnety_tiny"}


def test_unknown_backbone_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown backbone 'resnet50'"):
        build_backbone("resnet50")


def test_random_init_features_are_not_degenerate():
    # timm's default zero-inits each block's last BN; ours must not, or a random-init baseline is meaningless.
    backbone = build_backbone("regnety_micro", in_chans=1).eval()
    last_bns = [m.conv3.bn.weight for m in backbone.modules() if hasattr(m, "conv3")]
    assert last_bns and all(torch.all(w == 1) for w in last_bns)
    features = backbone(torch.randn(8, 1, 16, 16))
    assert features.std(0).mean() > 1e-3


def test_swav_model_multicrop_forward_backward():
    cfg = load_config("demo", ["model.backbone=regnety_micro", "model.head_hidden_dims=[32]", "model.embedding_dim=16",
                             "model.num_prototypes=20", "data.crops=[{size: 16, count: 2, scale: [0.4, 1]}, "
                             "{size: 8, count: 3, scale: [0.1, 0.4]}]"])
    torch.manual_seed(0)
    model = build_swav_model(cfg)
    crops = [torch.randn(4, 1, 16, 16)] * 2 + [torch.randn(4, 1, 8, 8)] * 3
    loss = model(crops)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    assert 0 < loss.item() < 2 * math.log(20)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no or non-finite gradient for {missing}"
    assert torch.allclose(model.head.prototypes[0].norm(dim=1), torch.ones(20))
