"""Tests for the model registry, the flat-parameter wrapper and BatchNorm recalibration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ormo_ps.common.evaluation import recompute_bn_stats
from ormo_ps.common.models import MODELS, FlatModel, build_model, cifar_resnet, count_parameters


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        # He et al. 2016, Table 6: 0.27M / 0.46M / 0.85M with option-A (parameter-free) shortcuts.
        ("resnet20", 269_722),
        ("resnet32", 464_154),
        ("resnet56", 853_018),
    ],
)
def test_resnet_parameter_counts_match_the_paper(name: str, expected: int) -> None:
    count = count_parameters(build_model(name, num_classes=10))
    assert count == expected
    paper_millions = {"resnet20": 0.27, "resnet32": 0.46, "resnet56": 0.85}[name]
    assert abs(count / 1e6 - paper_millions) < 0.01


def test_resnet_depths_registered() -> None:
    for depth in (20, 32, 44, 56, 110):
        assert f"resnet{depth}" in MODELS
    assert sum(isinstance(m, nn.Conv2d) for m in cifar_resnet(44).modules()) == 43


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 100])
def test_cifar_resnet_rejects_depths_not_6n_plus_2(depth: int) -> None:
    with pytest.raises(ValueError, match="6n\\+2"):
        cifar_resnet(depth)


@pytest.mark.parametrize("name", ["resnet20", "mlp", "small-cnn"])
@pytest.mark.parametrize(("input_shape", "num_classes"), [((3, 32, 32), 10), ((1, 8, 8), 10), ((3, 32, 32), 100)])
def test_forward_shapes(name: str, input_shape: tuple[int, ...], num_classes: int) -> None:
    model = build_model(name, num_classes, input_shape)
    out = model(torch.randn(2, *input_shape))
    assert out.shape == (2, num_classes)


def test_mlp_takes_flat_features() -> None:
    model = build_model("mlp", 3, (20,))
    assert model(torch.randn(5, 20)).shape == (5, 3)
    assert count_parameters(model) == 20 * 128 + 128 + 128 * 3 + 3


def test_unknown_model_lists_valid_names_sorted() -> None:
    with pytest.raises(ValueError) as info:
        build_model("resnet18", 10)
    message = str(info.value)
    assert "resnet18" in message
    assert ", ".join(sorted(MODELS)) in message


def test_build_model_is_reproducible_under_manual_seed() -> None:
    torch.manual_seed(123)
    a = FlatModel(build_model("resnet20", 10)).params.clone()
    torch.manual_seed(123)
    b = FlatModel(build_model("resnet20", 10)).params.clone()
    torch.manual_seed(124)
    c = FlatModel(build_model("resnet20", 10)).params.clone()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _batch(input_shape: tuple[int, ...] = (3, 32, 32), n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, *input_shape, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def test_flat_model_params_are_a_live_view_both_ways() -> None:
    torch.manual_seed(0)
    model = build_model("small-cnn", 10)
    flat = FlatModel(model)
    assert flat.numel == count_parameters(model)
    assert torch.equal(flat.params, torch.cat([p.detach().flatten() for p in model.parameters()]))

    flat.params.fill_(0.5)
    assert all(torch.all(p == 0.5) for p in model.parameters())

    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = 7.0
    assert flat.params[0] == 7.0
    assert flat.module is model


def test_flat_model_grads_equal_concatenated_param_grads() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, (3, 8, 8))
    flat = FlatModel(model)
    x, y = _batch((3, 8, 8))
    F.cross_entropy(model(x), y).backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert torch.count_nonzero(expected) > 0
    assert torch.equal(flat.grads, expected)

    # A second backward accumulates into the same buffer, as autograd does for ordinary .grad tensors.
    F.cross_entropy(model(x), y).backward()
    assert torch.allclose(flat.grads, 2 * expected, rtol=1e-5, atol=1e-7)

    flat.zero_grad_()
    assert torch.count_nonzero(flat.grads) == 0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_flat_model_survives_set_to_none_zero_grad_and_optimizer_step() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 8, 8))
    flat = FlatModel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _batch((1, 8, 8))
    optimizer.zero_grad()  # set_to_none=True detaches every .grad from the flat buffer
    F.cross_entropy(model(x), y).backward()
    grads = flat.grads.clone()
    assert torch.equal(grads, torch.cat([p.grad.flatten() for p in model.parameters()]))
    before = flat.params.clone()
    optimizer.step()
    assert torch.allclose(flat.params, before - 0.1 * grads)
    # After re-attachment the next backward lands in the flat buffer directly.
    flat.zero_grad_()
    F.cross_entropy(model(x), y).backward()
    assert model.fc1.weight.grad.data_ptr() == flat.grads.data_ptr()


def test_flat_model_load_copies_and_validates() -> None:
    flat = FlatModel(build_model("mlp", 10, (1, 8, 8)))
    vec = torch.arange(flat.numel, dtype=torch.float32)
    flat.load_(vec)
    assert torch.equal(flat.params, vec)
    vec.zero_()  # load_ copies: the caller's tensor is not aliased
    assert flat.params[1] == 1.0
    with pytest.raises(ValueError, match=f"{flat.numel - 1} elements.*{flat.numel} parameters"):
        flat.load_(torch.zeros(flat.numel - 1))
    with pytest.raises(ValueError, match="float32.*float64"):
        flat.load_(torch.zeros(flat.numel, dtype=torch.float64))


def test_flat_model_excludes_buffers_and_frozen_parameters() -> None:
    model = build_model("resnet20", 10)
    model.linear.bias.requires_grad_(False)
    flat = FlatModel(model)
    assert flat.numel == 269_722 - 10
    assert flat.numel == count_parameters(model)
    buffers = sum(b.numel() for b in model.buffers())
    assert buffers > 0
    assert model.bn1.running_mean.data_ptr() != flat.params.data_ptr()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flat_model_on_cuda() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10)
    flat = FlatModel(model, device="cuda")
    assert flat.params.is_cuda and flat.grads.is_cuda
    x, y = _batch()
    F.cross_entropy(model(x.cuda()), y.cuda()).backward()
    assert torch.equal(flat.grads, torch.cat([p.grad.flatten() for p in model.parameters()]))
    flat.load_(torch.zeros(flat.numel))  # from CPU
    assert torch.count_nonzero(flat.params) == 0


def test_recompute_bn_stats_uses_exact_batch_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    model.eval()
    bn = model[0]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(9.0)
    shift = torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1)
    batches = [torch.randn(16, 3, 6, 6) * 2 + shift for _ in range(4)]

    recompute_bn_stats(model, batches)

    everything = torch.cat(batches)
    assert torch.allclose(bn.running_mean, everything.mean(dim=(0, 2, 3)), atol=1e-5)
    # momentum=None is a cumulative average of the per-batch (unbiased) variances.
    per_batch_var = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches])
    assert torch.allclose(bn.running_var, per_batch_var.mean(0), atol=1e-4)
    assert int(bn.num_batches_tracked) == 4
    assert bn.momentum == 0.1
    assert not model.training and not bn.training


def test_recompute_bn_stats_restores_train_mode_and_custom_momentum() -> None:
    model = nn.Sequential(nn.BatchNorm1d(2, momentum=0.3))
    model.train()
    recompute_bn_stats(model, [torch.tensor([[1.0, 2.0], [3.0, 6.0]])])
    assert model.training
    assert model[0].momentum == 0.3
    assert torch.allclose(model[0].running_mean, torch.tensor([2.0, 4.0]))


def test_recompute_bn_stats_without_batch_norm_is_a_no_op() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 10, (1, 8, 8))
    before = FlatModel(model).params.clone()
    recompute_bn_stats(model, [])
    assert torch.equal(FlatModel(model).params, before)


def test_recompute_bn_stats_rejects_no_batches_and_keeps_old_stats() -> None:
    model = nn.Sequential(nn.BatchNorm2d(3))
    model[0].running_mean.fill_(2.0)
    with pytest.raises(ValueError, match="empty"):
        recompute_bn_stats(model, iter([]))
    assert torch.all(model[0].running_mean == 2.0)


def test_recompute_bn_stats_on_resnet_changes_eval_outputs() -> None:
    torch.manual_seed(0)
    model = build_model("resnet20", 10, (3, 8, 8))
    x = torch.randn(32, 3, 8, 8) * 3 + 1
    model.eval()
    before = model(x)
    recompute_bn_stats(model, [x])
    after = model(x)
    model.train()
    with torch.no_grad():
        batch_stats_output = model(x)
    # With stats computed on exactly this batch, eval mode matches train mode's batch statistics up to the
    # biased/unbiased variance factor N/(N-1) on every layer.
    assert not torch.allclose(before, after)
    assert torch.allclose(after, batch_stats_output, rtol=0.05, atol=0.05)


def test_count_parameters_counts_trainable_only() -> None:
    model = nn.Linear(3, 2)
    assert count_parameters(model) == 8
    model.bias.requires_grad_(False)
    assert count_parameters(model) == 6
