"""Linear probes on frozen features: full labels and low-shot (a class-balanced fraction of the labels)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

WEIGHT_DECAYS = (1e-6, 1e-4, 1e-2)  # L2 strengths tried on a held-out part of the training labels


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float,
                            max_iter: int = 100) -> torch.nn.Linear:
    """Multinomial logistic regression fitted full-batch with L-BFGS from zero: deterministic, no lr to tune."""
    classifier = torch.nn.Linear(features.shape[1], num_classes)
    torch.nn.init.zeros_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    x, y = features.float(), labels
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(x), y) + weight_decay * classifier.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return classifier


def accuracy(classifier: torch.nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (classifier(features.float()).argmax(1) == labels).float().mean().item()


def _moments(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return train.mean(0), train.std(0).clamp_min(1e-6)


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = _moments(train)
    return [(t - mean) / std for t in (train, *others)]


@dataclass
class LinearProbe:
    """A fitted probe: logits = classifier((features - mean) / std), mean and std those of its training features."""

    classifier: torch.nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    weight_decay: float
    val_top1: float  # accuracy on the held-out part of train with the chosen weight decay

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        return accuracy(self.classifier, (features - self.mean) / self.std, labels)


def fit_linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, num_classes: int, *,
                     val_fraction: float = 0.1, seed: int = 0) -> LinearProbe:
    """A linear classifier on standardized features whose weight decay is chosen on a held-out part of train.

    The held-out part is class-balanced at random (fixed seed); the chosen model is refitted on all of train.
    """
    val_mask = torch.zeros(len(train_labels), dtype=torch.bool)
    for chosen in _draw_per_class(train_labels, num_classes, lambda c, n: max(1, round(val_fraction * n)), seed):
        val_mask[chosen] = True
    fit_x, val_x = _standardize(train_features[~val_mask], train_features[val_mask])
    scores = {wd: accuracy(fit_logistic_regression(fit_x, train_labels[~val_mask], num_classes, wd), val_x,
                           train_labels[val_mask]) for wd in WEIGHT_DECAYS}
    best = max(scores, key=scores.get)  # ties: the smallest decay, the first listed
    mean, std = _moments(train_features)
    classifier = fit_logistic_regression((train_features - mean) / std, train_labels, num_classes, best)
    return LinearProbe(classifier, mean, std, best, scores[best])


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, val_fraction: float = 0.1, seed: int = 0) -> dict:
    """Test top-1 of fit_linear_probe(train), with the chosen weight decay and its held-out accuracy."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = fit_linear_probe(train_features, train_labels, num_classes, val_fraction=val_fraction, seed=seed)
    return {"top1": probe.accuracy(test_features, test_labels), "weight_decay": probe.weight_decay,
            "val_top1": probe.val_top1}


def _draw_per_class(labels: torch.Tensor, num_classes: int, count, seed: int):
    """For each class in turn, `count(class, members)` of its sample indices drawn at random (one seeded stream)."""
    generator = torch.Generator().manual_seed(seed)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        yield members[torch.randperm(len(members), generator=generator)[: count(c, len(members))]]


def class_balanced_subset(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Indices of `fraction` of the samples, the same count from every class (at least 2 each)."""
    num_classes = int(labels.max()) + 1
    per_class = max(2, round(fraction * len(labels) / num_classes))

    def count(c: int, members: int) -> int:
        if members < per_class:
            raise ValueError(f"class {c} has {members} samples, fewer than the {per_class} a "
                             f"{fraction:.0%} low-shot split needs")
        return per_class

    return torch.cat(list(_draw_per_class(labels, num_classes, count, seed))).sort().values


def low_shot_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                   test_labels: torch.Tensor, *, fraction: float, seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Linear probe trained on a class-balanced `fraction` of the labels: mean and std over several draws."""
    results = []
    for seed in seeds:
        subset = class_balanced_subset(train_labels, fraction, seed)
        results.append(linear_probe(train_features[subset], train_labels[subset], test_features, test_labels,
                                    val_fraction=0.2, seed=seed)["top1"])
    values = torch.tensor(results, dtype=torch.float64)
    return {"top1": values.mean().item(), "std": values.std().item() if len(results) > 1 else 0.0,
            "draws": results}
