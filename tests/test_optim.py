import math

import pytest
import torch
from torch import nn

from engine.config import load_config
from engine.training.optim import LARS, NO_DECAY, PROTOTYPES, WEIGHTS, build_optimizer, lr_schedule, parameter_groups, schedules


def lars_by_hand(w, grads, lr, momentum, wd, eta, eps=1e-8):
    """apex LARC (clip=False) in front of SGD momentum, written out in fp64."""
    w, buf = w.double().clone(), None
    for g in grads:
        g = g.double()
        ratio = eta * w.norm() / (g.norm() + wd * w.norm() + eps)
        d = (g + wd * w) * ratio
        buf = d if buf is None else momentum * buf + d
        w = w - lr * buf
    return w


def test_lars_matches_the_formula():
    torch.manual_seed(0)
    w0 = torch.randn(7, 5)
    grads = [torch.randn(7, 5) for _ in range(4)]
    p = nn.Parameter(w0.clone())
    opt = LARS([p], lr=0.5, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = lars_by_hand(w0, grads, 0.5, 0.9, 1e-4, 0.02)
    torch.testing.assert_close(p.detach().double(), expected, rtol=1e-5, atol=1e-6)


def test_pieces_of_parameters_in_flat_tensors_step_as_the_whole_parameters():
    """As under ZeRO: the optimizer steps flat tensors holding pieces of parameters (and padding); with the layout,
    LARS takes each parameter's norm over all its pieces (here both in one process, so nothing to all-reduce)."""
    torch.manual_seed(0)
    shapes = [(7, 5), (3, 4)]
    w0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    whole = [nn.Parameter(w.clone()) for w in w0]
    reference = LARS(whole, lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
    for step_grads in grads:
        for p, g in zip(whole, step_grads):
            p.grad = g.clone()
        reference.step()

    def flats(tensors):  # parameter 0 is cut after 20 elements; 3 elements of padding end the second flat tensor
        a, b = (t.flatten() for t in tensors)
        return [a[:20].clone(), torch.cat([a[20:], b, torch.zeros(3)])]

    opt = LARS([nn.Parameter(w.clone()) for w in w0], lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coefficient=0.02)
    pieces = [nn.Parameter(f) for f in flats(w0)]
    opt.param_groups[0]["params"] = pieces
    opt.set_layout({pieces[0]: [(0, 0, 20)], pieces[1]: [(1, 15, 12), (0, 0, 15)]})
    for step_grads in grads:
        for piece, g in zip(pieces, flats(step_grads)):
            piece.grad = g
        opt.step()
    for got, want in zip(pieces, flats([p.detach() for p in whole])):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)


def test_stepping_a_tensor_without_layout_is_refused():
    opt = LARS([nn.Parameter(torch.ones(4))], lr=0.1)
    flat = nn.Parameter(torch.ones(6))  # what DeepSpeed ZeRO puts in the groups
    flat.grad = torch.ones(6)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="attach_zero_layout"):
        opt.step()


def test_zero_lr_group_is_frozen_including_momentum():
    a, b = nn.Parameter(torch.ones(3, 3)), nn.Parameter(torch.ones(3, 3))
    opt = LARS([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.0}], momentum=0.9)
    for _ in range(2):
        a.grad, b.grad = torch.ones(3, 3), torch.ones(3, 3)
        opt.step()
    assert torch.equal(b, torch.ones(3, 3)) and "momentum_buffer" not in opt.state[b]
    assert not torch.equal(a, torch.ones(3, 3))


def test_zero_weight_takes_the_plain_step():
    p = nn.Parameter(torch.zeros(4))
    opt = LARS([p], lr=0.1, momentum=0.0)
    p.grad = torch.ones(4)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((4,), -0.1))


def test_parameter_groups_put_biases_and_norms_under_lars_unless_excluded():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))
    model.prototypes = nn.Parameter(torch.randn(5, 8))
    groups = {g["name"]: g for g in parameter_groups(model, weight_decay=1e-5)}
    assert set(groups) == {WEIGHTS, PROTOTYPES}  # SEER: LARC and weight decay on every parameter
    assert len(groups[WEIGHTS]["params"]) == 4 and groups[WEIGHTS]["lars"] and groups[WEIGHTS]["weight_decay"] == 1e-5
    assert groups[PROTOTYPES]["params"][0] is model.prototypes and groups[PROTOTYPES]["lars"]
    groups = {g["name"]: g for g in parameter_groups(model, weight_decay=1e-5, exclude_bias_and_norm=True)}
    assert [p.shape for p in groups[WEIGHTS]["params"]] == [torch.Size([8, 4])]
    assert len(groups[NO_DECAY]["params"]) == 3 and groups[NO_DECAY]["weight_decay"] == 0 and not groups[NO_DECAY]["lars"]


@pytest.mark.parametrize("exclude", [False, True])
def test_trust_ratio_applies_to_1d_parameters_by_default(exclude):
    """One step of a BatchNorm weight: scaled by its LARS trust ratio, or the plain SGD step with the option."""
    cfg = load_config(None, [f"optim.exclude_bias_and_norm={str(exclude).lower()}", "optim.weight_decay=0.01",
                             "optim.trust_coefficient=0.02", "optim.momentum=0"])
    norm = nn.BatchNorm1d(4)
    opt = build_optimizer(norm, cfg.optim)
    for group in opt.param_groups:
        group["lr"] = 0.5
    w0 = norm.weight.detach().clone()
    norm.weight.grad, norm.bias.grad = torch.full((4,), 2.0), torch.zeros(4)
    opt.step()
    wd, eta = (0.0, None) if exclude else (0.01, 0.02)
    update = norm.weight.grad + wd * w0
    if not exclude:
        update = update * eta * w0.norm() / (norm.weight.grad.norm() + wd * w0.norm() + 1e-8)
    torch.testing.assert_close(norm.weight.detach(), w0 - 0.5 * update)


def test_sgd_option_has_no_trust_ratio():
    cfg = load_config("demo", ["optim.name=sgd"])
    opt = build_optimizer(nn.Linear(3, 3), cfg.optim)
    assert all(not g["lars"] for g in opt.param_groups)


def test_schedule_warmup_cosine_and_prototype_freeze():
    values = lr_schedule(110, peak=2.0, warmup_steps=10, final_fraction=0.001)
    assert len(values) == 110 and values[0] == pytest.approx(0.2) and values[9] == pytest.approx(2.0)
    assert values[10] == pytest.approx(2.0) and values[-1] == pytest.approx(0.002)
    assert all(x >= y for x, y in zip(values[10:], values[11:]))
    cfg = load_config("demo", ["train.steps=200", "swav.freeze_prototypes_steps=50", "optim.lr=0.3"])
    lr = schedules(cfg, global_batch=512)
    assert max(lr[WEIGHTS]) == pytest.approx(0.6)  # lr is per 256 images
    assert lr[PROTOTYPES][:50] == [0.0] * 50 and lr[PROTOTYPES][50:] == lr[WEIGHTS][50:]
    assert math.isclose(lr[NO_DECAY][70], lr[WEIGHTS][70])
