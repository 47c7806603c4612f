"""Activation checkpointing (DeepSpeed's API) changes memory, not results: same gradients, same BN buffers."""
import copy

import pytest
import torch

from engine.models.activation_checkpointing import checkpointed_modules, enable_activation_checkpointing
from engine.config import ConfigError
from engine.distributed import init_distributed
from engine.models.backbone import build_backbone
from tiny_run import demo_config


@pytest.fixture(scope="module")
def backbone():
    init_distributed()  # DeepSpeed's checkpointing reads its process group
    torch.manual_seed(0)
    return build_backbone("regnety_tiny", in_chans=1)  # 2-3 blocks per stage: block and stage differ


def train_step(model, images):
    """Loss, gradients and buffers after one training step, and the bytes autograd kept for the backward pass."""
    kept = {}

    def keep(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(images).square().mean()
    loss.backward()
    return loss, [p.grad for p in model.parameters()], list(model.buffers()), sum(kept.values())


@pytest.mark.parametrize("granularity", ["block", "stage"])
def test_checkpointing_gives_the_same_step_with_less_kept(backbone, granularity):
    images = torch.randn(16, 1, 32, 32)
    plain = train_step(copy.deepcopy(backbone), images)
    model = enable_activation_checkpointing(copy.deepcopy(backbone), granularity)
    checkpointed = train_step(model, images)
    assert torch.equal(plain[0], checkpointed[0])
    for reference, value in zip(plain[1] + plain[2], checkpointed[1] + checkpointed[2]):
        torch.testing.assert_close(value, reference, rtol=0, atol=1e-6)  # BN running stats updated once, not twice
    assert checkpointed[3] < 0.4 * plain[3], (granularity, checkpointed[3], plain[3])
    assert {name for name, _ in model.state_dict().items()} == set(backbone.state_dict())  # timm names kept
    # A deep copy is checkpointed on its own weights, not the original's.
    copied = copy.deepcopy(model)
    assert copied.s2.b1.forward.__self__ is copied.s2.b1


def test_granularities_and_bad_values(backbone):
    blocks = checkpointed_modules(backbone, "block")
    stages = checkpointed_modules(backbone, "stage")
    assert len(stages) == 4 and len(blocks) == sum(len(list(s.children())) for s in stages) > 4
    assert checkpointed_modules(backbone, "none") == []
    with pytest.raises(ValueError, match="model.activation_checkpointing"):
        checkpointed_modules(backbone, "layer")
    with pytest.raises(ConfigError, match="model.activation_checkpointing"):
        demo_config("model.activation_checkpointing=layer")
