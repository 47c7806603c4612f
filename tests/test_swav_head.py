"""The engine's SwAV head: several prototype heads, the embedding queue, and both through pretraining."""
import json
import shutil

import pytest
import torch

import kernels
from engine.models.swav import SwAVHead, SwAVLoss
from engine.models.weights import load_backbone_weights
from engine.training.export import export
from engine.training.pretrain import Pretrainer, pretrain
from tiny_run import final_weights, tiny_config

LOSS = SwAVLoss(crops_for_assign=(0, 1), temperature=0.1, epsilon=0.05, sinkhorn_iterations=3, backend="torch")
N_CROPS, B, D = 3, 6, 8


def make_head(heads, queue_length=0) -> SwAVHead:
    torch.manual_seed(0)
    return SwAVHead(10, [16], D, heads, batch_norm=False, loss=LOSS, queue_length=queue_length)


def test_loss_is_the_mean_over_prototype_heads():
    head = make_head([12, 20])
    features = torch.randn(N_CROPS * B, 10)
    loss = head(features, n_crops=N_CROPS)
    embeddings = head.projection(features)
    per_head = [kernels.swav_loss(embeddings, p, n_crops=N_CROPS, crops_for_assign=(0, 1), epsilon=0.05,
                                  backend="torch") for p in head.prototypes]
    torch.testing.assert_close(loss, torch.stack(per_head).mean())
    torch.testing.assert_close(torch.stack(head.head_losses), torch.stack(per_head).detach())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.prototypes)
    counts = head.take_assignment_counts()
    assert [c.shape[0] for c in counts] == [12, 20] and all(c.sum() == 2 * B for c in counts)


def test_queue_is_a_fifo_of_assigned_crops_that_joins_sinkhorn_once_full():
    head = make_head(12, queue_length=2 * B)
    head.queue_started = True
    batches = [torch.randn(N_CROPS * B, 10) for _ in range(3)]
    expected_queue = []
    for i, features in enumerate(batches):
        embeddings = head.projection(features).detach()
        queue = head.queue.clone() if i == 2 else None  # full only after two batches of B
        loss = head(features, n_crops=N_CROPS)
        reference = kernels.swav_loss(embeddings, head.prototypes[0], n_crops=N_CROPS, crops_for_assign=(0, 1),
                                      epsilon=0.05, backend="torch", queue=queue)
        torch.testing.assert_close(loss, reference, msg=f"batch {i}")
        expected_queue.insert(0, embeddings.view(N_CROPS, B, D)[:2])
    # Newest first, the oldest batch dropped.
    torch.testing.assert_close(head.queue, torch.cat(expected_queue[:2], dim=1))
    assert head.queue_filled == 2 * B
    state = head.queue_state()
    other = make_head(12, queue_length=2 * B)
    other.load_queue_state(state)
    assert torch.equal(other.queue, head.queue) and other.queue_filled == head.queue_filled
    with pytest.raises(ValueError, match=r"queue has shape \(2, 12, 8\), this run's \(2, 6, 8\)"):
        make_head(12, queue_length=B).load_queue_state(state)


def test_queue_stays_empty_until_started_and_is_not_in_the_state_dict():
    head = make_head(12, queue_length=B)
    head(torch.randn(N_CROPS * B, 10), n_crops=N_CROPS)
    assert head.queue_filled == 0 and not head.queue.any()
    assert "queue" not in head.state_dict()  # per rank: checkpointed with each rank's trainer state


HEADS_AND_QUEUE = ("model.num_prototypes=[20, 24]", "swav.queue_length=32", "swav.queue_start_step=1")


def test_heads_and_queue_resume_equals_uninterrupted_and_export_the_backbone(shards, tmp_path):
    pretrain(tiny_config(shards, tmp_path / "straight", *HEADS_AND_QUEUE))
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "straight", interrupted)
    # A crash right after the step-3 checkpoint: the later checkpoint and outputs never happened.
    shutil.rmtree(interrupted / "checkpoints" / "step_00000006")
    (interrupted / "backbone_final.pt").unlink()
    (interrupted / "checkpoints" / "latest").write_text("step_00000003")
    trainer = Pretrainer(tiny_config(shards, interrupted, *HEADS_AND_QUEUE), resume=True)
    try:
        assert trainer.model.head.queue_filled == 32  # 3 steps x 16 images from step 1 on, capped
        trainer.train()
    finally:
        trainer.close()
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(interrupted)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    records = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_head0", "loss_head1", "proto_used_head0", "proto_used_head1"} <= set(records[-1])
    assert records[-1]["loss"] == pytest.approx((records[-1]["loss_head0"] + records[-1]["loss_head1"]) / 2)
    # Export reads the backbone out of the checkpoint as with one head.
    export(interrupted / "checkpoints", tmp_path / "backbone.safetensors")
    exported = load_backbone_weights(tmp_path / "backbone.safetensors").state_dict()
    assert exported.keys() == resumed.keys() and all(torch.equal(exported[k], resumed[k]) for k in resumed)
