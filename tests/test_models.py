import pytest
import torch
from torch import nn
from torch.func import functional_call, vmap

from asbnn.errors import ConfigError
from asbnn.models import create_model, list_models, register_model

# (name, in_channels, input size) for every shape/functional test; the deep ResNets (the same code
# as resnet20, more blocks) only in the full suite
_DEEP = ("resnet56", "resnet110")
CASES = [
    pytest.param(name, channels, size, id=f"{name}-{channels}x{size}",
                 marks=[pytest.mark.slow] if name in _DEEP else [])
    for name, channels, size in [
        ("allconv", 1, 28), ("allconv", 3, 32), ("lenet5", 1, 28), ("lenet5", 3, 32), ("resnet20", 3, 32),
        ("resnet32", 3, 32), ("resnet44", 3, 32), ("resnet56", 3, 32), ("resnet110", 3, 32), ("vgg16_bn", 3, 32),
    ]
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def calibrated(name: str, in_channels: int, size: int) -> tuple[nn.Module, torch.Tensor]:
    """An eval-mode model whose BN running stats are real batch stats, so deep nets stay O(1)."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=in_channels)
    x = torch.randn(4, in_channels, size, size)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average: one pass stores the batch stats exactly
    with torch.no_grad():
        model.train()(x)
    return model.eval(), x


def test_list_models():
    resnets = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
    assert list_models() == ["allconv", "lenet5", "mlp", *resnets, "vgg16_bn"]


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown model 'resnet19'; valid: allconv, lenet5, mlp, resnet20, .*vgg16_bn"):
        create_model("resnet19")


@pytest.mark.parametrize("bad", [0, -3, 2.0, True])
def test_bad_num_classes(bad):
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet20", num_classes=bad)


def test_duplicate_registration_rejected():
    with pytest.raises(ConfigError, match="already registered"):
        register_model("resnet20")(lambda num_classes=10, in_channels=3: nn.Identity())


@pytest.mark.parametrize(
    "name, in_channels, expected",
    [
        # Option-A ResNets: 16*in*9 + BN + stages + Linear(64, 10); option B would add 2,752.
        ("resnet20", 3, 269_722),
        ("resnet32", 3, 464_154),
        ("resnet44", 3, 658_586),
        ("resnet56", 3, 853_018),
        ("resnet110", 3, 1_727_962),
        ("vgg16_bn", 3, 14_728_266),
        # 150 + 12 + 2400 + 32 + 48120 + 10164 + 850
        ("lenet5", 1, 61_728),
        # 144 + 32 + 4608 + 64 + 18432 + 128 + 650
        ("allconv", 1, 24_058),
    ],
)
def test_parameter_counts(name, in_channels, expected):
    assert n_params(create_model(name, in_channels=in_channels)) == expected


@pytest.mark.parametrize("name, in_channels, size", CASES)
def test_output_shape_and_num_classes(name, in_channels, size):
    for classes in (10, 7):
        model = create_model(name, num_classes=classes, in_channels=in_channels).eval()
        with torch.no_grad():
            out = model(torch.randn(3, in_channels, size, size))
        assert out.shape == (3, classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name, in_channels, size", CASES)
def test_functional_call_matches_forward(name, in_channels, size):
    model, x = calibrated(name, in_channels, size)
    with torch.no_grad():
        expected = model(x)
        got = functional_call(model, dict(model.named_parameters()), (x,))
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name, in_channels, size", CASES)
def test_train_mode_backward(name, in_channels, size):
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels).train()
    x = torch.randn(2, in_channels, size, size)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name, in_channels, size", CASES)
def test_vmap_over_parameter_sets(name, in_channels, size):
    model, x = calibrated(name, in_channels, size)
    p0 = {k: v.detach() for k, v in model.named_parameters()}
    p1 = {k: v + 0.05 * torch.randn_like(v) for k, v in p0.items()}
    stacked = {k: torch.stack([p0[k], p1[k]]) for k in p0}
    with torch.no_grad():
        batched = vmap(lambda p: functional_call(model, p, (x,)))(stacked)
        separate = torch.stack([functional_call(model, p, (x,)) for p in (p0, p1)])
    assert batched.shape == (2, x.shape[0], 10)
    torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-4)
