"""Training monitors (engine/training/monitor.py): prototype usage, the collapse warning, the online kNN."""
import math

import pytest
import torch
from tiny_run import demo_config, metrics_records, tiny_config

from engine.config import ConfigError, MonitorConfig
from engine.evaluation.evaluate import evaluate, knn_top1, split_features
from engine.models.weights import load_backbone_weights
from engine.models.backbone import build_backbone
from engine.models.swav import SwAVHead, SwAVLoss
from engine.training.monitor import CollapseMonitor, OnlineKnn, prototype_usage
from engine.training.pretrain import pretrain

K = 20  # prototypes of the tiny test config


def test_prototype_usage_matches_an_fp64_reference():
    usage = prototype_usage(torch.tensor([5, 0, 3, 0, 2]))
    assert usage["proto_used"] == 3
    assert usage["proto_entropy"] == pytest.approx(-sum(p * math.log(p) for p in (0.5, 0.3, 0.2)), rel=1e-12)
    assert prototype_usage(torch.full((K,), 7))["proto_entropy"] == pytest.approx(math.log(K), rel=1e-12)
    single = prototype_usage(torch.tensor([0, 9, 0]))
    assert single == {"proto_used": 1, "proto_entropy": 0.0} and math.copysign(1, single["proto_entropy"]) == 1


def test_head_counts_the_nearest_prototype_of_each_assigned_crop():
    torch.manual_seed(0)
    loss = SwAVLoss(crops_for_assign=(0, 2), temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, backend="torch")
    head = SwAVHead(8, [16], 6, K, batch_norm=False, loss=loss)
    batches = [torch.randn(4 * 10, 8) for _ in range(2)]  # 4 crops x 10 images, crop-major
    expected = torch.zeros(K, dtype=torch.long)
    for features in batches:
        head(features, n_crops=4)
        with torch.no_grad():  # fp64 reference of the assigned crops (0 and 2) only
            assigned = head.projection(features).double().view(4, 10, 6)[[0, 2]].reshape(20, 6)
            nearest = (assigned / assigned.norm(dim=1, keepdim=True) @ head.prototypes[0].double().T).argmax(1)
        expected += torch.bincount(nearest, minlength=K)
    assert torch.equal(head.take_assignment_counts()[0], expected) and expected.sum() == 2 * 2 * 10
    assert head.take_assignment_counts() is None  # taking resets
    head.eval()
    head(batches[0], n_crops=4)
    assert head.take_assignment_counts() is None  # only training forwards count


def one_prototype(assignments=64):
    return torch.bincount(torch.full((assignments,), 3), minlength=K)


def spread(generator, assignments=64):
    return torch.bincount(torch.randint(K, (assignments,), generator=generator), minlength=K)


def test_collapse_monitor_on_synthetic_windows():
    generator = torch.Generator().manual_seed(0)
    cfg = MonitorConfig(collapse_check_from_step=3, collapse_patience=3)
    ln_k = math.log(K)

    def flags(loss, counts, steps=10):
        warnings = []
        monitor = CollapseMonitor(cfg, K, warnings.append)
        return [monitor.update(step, loss, counts())["collapse"] for step in range(1, steps + 1)], warnings

    # Everything on one prototype at loss ln K: flagged once 3 windows from step 3 on agree, warned once.
    collapsed, warnings = flags(ln_k, one_prototype)
    assert collapsed == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert len(warnings) == 1 and "step 5" in warnings[0] and "1 at least once" in warnings[0]
    # Each criterion alone suffices: loss at ln K with spread codes, or a low loss with one prototype.
    assert flags(1.02 * ln_k, lambda: spread(generator))[0][-1] == 1
    assert flags(0.5 * ln_k, one_prototype)[0][-1] == 1
    # Healthy: loss well below ln K, codes spread over the prototypes.
    healthy, warnings = flags(0.7 * ln_k, lambda: spread(generator))
    assert healthy == [0] * 10 and warnings == []
    # A loss far above ln K is early training, not collapse.
    assert flags(1.5 * ln_k, lambda: spread(generator))[0] == [0] * 10
    # A healthy window breaks the streak: patience counts again.
    monitor = CollapseMonitor(cfg, K)
    windows = [one_prototype, one_prototype, lambda: spread(generator), one_prototype, one_prototype, one_prototype]
    assert [monitor.update(3 + i, 0.5 * ln_k, counts())["collapse"] for i, counts in enumerate(windows)] == \
        [0, 0, 0, 0, 0, 1]


REAL = ("train.steps=12", "monitor.collapse_check_from_step=6", "monitor.collapse_patience=3")


def test_healthy_run_is_not_flagged_and_logs_online_knn(shards, tmp_path, capfd):
    cfg = tiny_config(shards, tmp_path / "run", *REAL, "monitor.knn_every=6")
    pretrain(cfg)
    logged = metrics_records(tmp_path / "run")
    assert [r["collapse"] for r in logged] == [0] * 12
    assert "looks collapsed" not in capfd.readouterr().err
    for r in logged:
        assert 1 <= r["proto_used"] <= K and 0 <= r["proto_entropy"] <= math.log(K)
        assert r["loss_over_ln_k"] == pytest.approx(r["loss"] / math.log(K))
    knn = {r["step"]: r["knn_top1"] for r in logged if "knn_top1" in r}
    # 40 test images of 10 classes: 8 or more right by chance has p < 0.05. Seen: 0.35 and 0.325.
    assert sorted(knn) == [6, 12] and all(0.2 <= v <= 1 for v in knn.values()), knn
    # The last online value is the offline kNN of the final weights (same shards, k, temperature).
    offline = evaluate(load_backbone_weights(tmp_path / "run" / "backbone_final.pt"), cfg, ("knn",))["knn_top1"]
    assert knn[12] == offline


@pytest.mark.parametrize("setting, criterion", [
    # SGD at ~100x the demo's LARS learning rate with frozen prototypes: every crop lands on the same 1-4 prototypes
    # (entropy <= 0.23 ln K from step 2; at lr 20 it hovered at the 0.3 threshold).
    (("optim.name=sgd", "optim.lr=100", "swav.freeze_prototypes_steps=1000"), "usage"),
    # A softmax temperature of 100 makes every prediction uniform: the loss stays at ln K, nothing is learned.
    (("swav.temperature=100",), "loss"),
])
def test_collapsed_run_is_flagged(shards, tmp_path, capfd, setting, criterion):
    pretrain(tiny_config(shards, tmp_path / "run", *REAL, *setting))
    logged = metrics_records(tmp_path / "run")
    assert [r["collapse"] for r in logged] == [0] * 7 + [1] * 5  # windows 6, 7, 8 make the streak
    assert capfd.readouterr().err.count("looks collapsed") == 1
    late = logged[5:]
    if criterion == "usage":
        assert all(r["proto_entropy"] < 0.3 * math.log(K) and abs(r["loss_over_ln_k"] - 1) > 0.05 for r in late)
    else:
        assert all(r["loss_over_ln_k"] == pytest.approx(1, abs=0.01) for r in late)


def test_two_ranks_sum_histograms_warn_once_and_run_knn_without_deadlock(two_rank_run):
    # Its thresholds flag every window, to read the summed histogram's size from the warning.
    run, launched = two_rank_run
    warnings = [line for line in (launched.stdout + launched.stderr).splitlines() if "looks collapsed" in line]
    assert len(warnings) == 1 and "the 64 assigned crops" in warnings[0]  # 2 ranks x 16 images x 2 assigned crops
    assert [r["step"] for r in metrics_records(run) if "knn_top1" in r] == [2, 4]


def test_online_knn_leaves_the_model_alone_and_matches_offline_knn(shards, tmp_path):
    cfg = tiny_config(shards, tmp_path, "model.channels_last=false", "monitor.knn_max_samples=50")
    torch.manual_seed(0)
    backbone = build_backbone(cfg.model.backbone, in_chans=cfg.data.channels).train()
    buffers = {name: b.clone() for name, b in backbone.named_buffers()}  # BN running statistics
    online = OnlineKnn(cfg, torch.device("cpu"), channels_last=False)(backbone)
    assert backbone.training
    assert all(torch.equal(b, buffers[name]) for name, b in backbone.named_buffers())
    # 100 train images cut to 50: the first 50 as the memory bank; the 40 test images whole.
    (train_x, train_y), (test_x, test_y) = split_features(backbone.eval(), cfg).values()
    assert online == knn_top1(train_x[:50], train_y[:50], test_x, test_y, k=cfg.eval.knn_k,
                              temperature=cfg.eval.knn_temperature)


def test_monitor_config_errors_name_the_key(shards, tmp_path):
    with pytest.raises(ConfigError, match="monitor.knn_train_shards"):
        demo_config("monitor.knn_every=10", "eval.train_shards=''")
    with pytest.raises(ConfigError, match="monitor.collapse_min_entropy"):
        demo_config("monitor.collapse_min_entropy=2")
    cfg = tiny_config(shards, tmp_path, f"monitor.knn_test_shards={tmp_path / 'missing'}")
    with pytest.raises(FileNotFoundError, match="monitor.knn_test_shards"):
        OnlineKnn(cfg, torch.device("cpu"), channels_last=False)
