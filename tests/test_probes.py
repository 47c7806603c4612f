import pytest
import torch

from dataloading.sources import load_idx
from engine.evaluation.evaluate import knn_top1
from engine.evaluation.probes import class_balanced_subset, linear_probe, low_shot_probe


@pytest.fixture(scope="module")
def pixels():
    """Real Fashion-MNIST images as 196-d features (2x2-pooled pixels): 2,000 train, 500 test."""
    train_x, train_y, _ = load_idx("fashion-mnist", "train")
    test_x, test_y, _ = load_idx("fashion-mnist", "test")

    def as_features(images):
        pooled = torch.nn.functional.avg_pool2d(torch.tensor(images[:, None], dtype=torch.float32), 2)
        return torch.nn.functional.normalize(pooled.flatten(1), dim=1)

    return (as_features(train_x[:2000]), torch.tensor(train_y[:2000]), as_features(test_x[:500]),
            torch.tensor(test_y[:500]))


@pytest.fixture(scope="module")
def pixel_probe(pixels):
    """The linear probe of the pixel features, fitted once for the tests that read it."""
    return linear_probe(*pixels)


def test_linear_probe_is_sane_and_deterministic(pixels, pixel_probe):
    assert 0.72 < pixel_probe["top1"] < 0.95  # raw-pixel logistic regression on Fashion-MNIST: ~0.8 at this size
    assert linear_probe(*pixels) == pixel_probe


def test_linear_probe_on_shuffled_labels_is_near_chance(pixels):
    train_x, train_y, test_x, test_y = pixels
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    assert linear_probe(train_x, shuffled, test_x, test_y)["top1"] < 0.2


def test_low_shot_subsets_are_class_balanced_and_seeded(pixels):
    labels = pixels[1]
    subset = class_balanced_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [20] * 10
    assert torch.equal(subset, class_balanced_subset(labels, 0.1, seed=0))
    assert not torch.equal(subset, class_balanced_subset(labels, 0.1, seed=1))
    with pytest.raises(ValueError, match="class 1 has 1 samples, fewer than the 2"):
        class_balanced_subset(torch.tensor([0, 0, 0, 1, 2, 2]), 0.5, seed=0)


def test_low_shot_improves_with_more_labels(pixels, pixel_probe):
    one = low_shot_probe(*pixels, fraction=0.02)
    ten = low_shot_probe(*pixels, fraction=0.2)
    assert len(one["draws"]) == 3 and one["std"] >= 0
    assert 0.3 < one["top1"] < ten["top1"] <= pixel_probe["top1"] + 0.02


def test_knn_on_pixels_is_sane(pixels):
    assert 0.7 < knn_top1(*pixels, k=20, temperature=0.07) < 0.95
