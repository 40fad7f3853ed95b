"""Convolution + residual + ReLU in one oneDNN call (`fusion`): the same function as the plain
operations, in fp32 and under bf16 autocast, and the plain operations wherever it cannot run."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from asbnn.fusion import _fusable, conv_relu, fuse_conv_relu
from asbnn.hardware import bf16_native


class Block(nn.Module):
    """Every pattern the rewrite meets: conv -> ReLU in three spellings, conv + residual -> ReLU,
    an addition that broadcasts (fused at trace time, refused by oneDNN at run time), and a
    convolution used twice (left alone)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 1)
        self.d, self.e = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.offset = nn.Parameter(torch.randn(1, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        x = self.act(self.b(x) + x)
        x = (self.c(x) + self.offset).relu()
        y = self.d(x)
        return torch.relu(self.e(F.relu(y))) + y.mean()


def _traced() -> tuple[nn.Module, fx.GraphModule]:
    torch.manual_seed(0)
    block = Block().eval()
    return block, fx.symbolic_trace(block)


def test_rewrites_each_conv_relu_and_computes_the_same(monkeypatch):
    block, graph = _traced()
    assert fuse_conv_relu(graph) == 4  # a, b (+ residual), c (+ broadcast offset), e; d is used twice
    assert sum(n.target is conv_relu for n in graph.graph.nodes) == 4
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        expected = block(x)
        for layout in (torch.contiguous_format, torch.channels_last):
            out = graph(x.contiguous(memory_format=layout))
            assert torch.allclose(out, expected, atol=1e-5 * expected.abs().max())
        nhwc = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, plain = graph(nhwc), block(nhwc)
        assert fast.dtype == plain.dtype
        assert torch.allclose(fast.float(), plain.float(), atol=0.05 * expected.abs().max())
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)  # the plain operations
        assert torch.allclose(graph(x), expected, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("groups, stride, dilation", [(1, 1, 1), (3, 2, 1), (6, 1, 2)])
def test_the_fused_call_is_the_plain_one_in_each_dtype(residual, groups, stride, dilation):
    torch.manual_seed(1)
    x = torch.randn(4, 6, 9, 9).contiguous(memory_format=torch.channels_last)  # the layout it fuses
    w, b = torch.randn(6, 6 // groups, 3, 3), torch.randn(6)
    args = ((stride, stride), (dilation, dilation), (dilation, dilation), groups)
    conv = F.conv2d(x, w, b, args[0], args[1], args[2], groups)
    r = torch.randn_like(conv) if residual else None
    plain = F.relu(conv + (r if residual else 0))
    assert _fusable(x, w, *args, r) == (groups == 1 or not residual)  # oneDNN's call, else the fallback
    assert not _fusable(x.contiguous(), w, *args, r)
    native = bf16_native(torch.device("cpu"))  # without native bf16, bf16 runs the plain ops
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an fp32 residual under autocast: plain ops (promotion)
        assert _fusable(x, w, *args, r) == (native and not residual)
        assert _fusable(x, w, *args, r if r is None else r.bfloat16()) == (native and (groups == 1 or not residual))
    fused = conv_relu(x, w, b, *args[:3], groups, r)
    assert torch.allclose(fused, plain, atol=1e-5 * plain.abs().max())  # another summation order at most
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv_relu(x, w, b, *args[:3], groups, r)
        plain_low = F.relu(F.conv2d(x, w, b, args[0], args[1], args[2], groups) + (r if residual else 0))
    assert low.dtype == plain_low.dtype  # bf16, or fp32 where the plain addition promotes an fp32 residual
    assert torch.allclose(low.float(), plain, atol=0.1, rtol=0.02)
