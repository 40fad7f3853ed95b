"""A 2-d convolution, the residual added to it and the ReLU after it in one oneDNN call on CPUs.

Why: after BatchNorm is folded into the convolutions (`evaluate.FoldedNetwork`), a ResNet's ReLUs
and residual additions are passes over memory that cost a third of its bf16 forward pass on a
CPU; oneDNN applies them to each output tile while it is in cache (a "post-op"). Measured on the
2-core Xeon in bf16, NHWC, 500 images of 16 channels at 32x32: convolution + ReLU 6.3 -> 4.7 ms,
convolution + addition + ReLU 8.2 -> 4.9 ms (docs/benchmarks.md).

`fuse_conv_relu` rewrites a traced graph; the fused node falls back to the plain operations where
oneDNN cannot run it (not a CPU, a PyTorch built without it, bf16 on a CPU without native bf16,
NCHW batches, a grouped convolution with a residual, shapes the post-op does not take), so
the rewritten graph computes the same function everywhere. In fp32 the fused call's numbers differ
from the plain ones in the last bits (the addition happens inside the convolution's output tile).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .hardware import bf16_native

_RELUS = (F.relu, torch.relu)
_ADDS = (operator.add, torch.add)
_ONEDNN_OPS = hasattr(torch.ops.mkldnn, "_convolution_pointwise")  # private to PyTorch: may go away


def conv_relu(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, ...],
              padding: tuple[int, ...], dilation: tuple[int, ...], groups: int,
              residual: Tensor | None = None) -> Tensor:
    """relu(conv2d(x) + residual), or relu(conv2d(x)) without a residual; in one oneDNN call where it
    can run, in the autocast dtype if autocast is on (the oneDNN op is not in autocast's lists)."""
    if not _fusable(x, weight, stride, padding, dilation, groups, residual):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return F.relu(out if residual is None else out + residual)
    dtype = _compute_dtype(x)
    with torch.autocast("cpu", enabled=False):
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        args = (list(padding), list(stride), list(dilation), groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *args, "relu", [], "")
        residual = residual.to(dtype).contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, weight, bias, *args,
                                                              "add", None, "relu", [], "")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a CPU convolution of `x` computes in: autocast's if it is on, else x's own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype


def _fusable(x: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
             dilation: tuple[int, ...], groups: int, residual: Tensor | None) -> bool:
    if x.device.type != "cpu" or not (_ONEDNN_OPS and torch.backends.mkldnn.is_available()) or x.dim() != 4:
        return False
    nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if not nhwc:  # NCHW bf16 with a residual fails inside PyTorch 2.13
        return False
    dtype = _compute_dtype(x)
    if dtype not in (torch.float32, torch.bfloat16):
        return False
    if dtype == torch.bfloat16 and not bf16_native(x.device):  # oneDNN's bf16 kernels: AMX or AVX-512 bf16
        return False
    if residual is None:
        return True
    if groups != 1:  # grouped convolution + residual in bf16 fails inside PyTorch 2.13 (add_relu)
        return False
    if residual.dtype != dtype:  # the plain addition would promote to the wider dtype
        return False
    size = [x.shape[0], weight.shape[0]] + [
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return list(residual.shape) == size  # oneDNN's post-op adds no broadcast operand


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function" and node.target in _RELUS:
        return len(node.args) == 1 and set(node.kwargs) <= {"inplace"}
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return len(node.args) == 1 and not node.kwargs
    return node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS and len(node.args) == 2 and not node.kwargs
            and all(isinstance(a, fx.Node) for a in node.args))


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def fuse_conv_relu(module: fx.GraphModule) -> int:
    """Rewrite every Conv2d whose only use is a ReLU, or an addition whose only use is a ReLU, into
    one `conv_relu` node (its weight and bias read by name, so `functional_call` can swap them);
    the number of convolutions fused. For inference only: oneDNN's fused op has no gradient."""
    modules = dict(module.named_modules())
    graph = module.graph
    fused = 0
    for node in list(graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if (type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
                or len(node.args) != 1 or node.kwargs):
            continue
        user = _only_user(node)
        residual = None
        if user is not None and _is_add(user) and user.args[0] is not user.args[1]:
            residual = user.args[1] if user.args[0] is node else user.args[0]
            user = _only_user(user)
        if user is None or not _is_relu(user, modules):
            continue
        with graph.inserting_before(user):
            weight = graph.get_attr(f"{node.target}.weight")
            bias = graph.get_attr(f"{node.target}.bias") if conv.bias is not None else None
            new = graph.call_function(conv_relu, (node.args[0], weight, bias, conv.stride, conv.padding,
                                                  conv.dilation, conv.groups, residual))
        user.replace_all_uses_with(new)
        add = user.args[0]
        graph.erase_node(user)
        if residual is not None:
            graph.erase_node(add)
        graph.erase_node(node)
        fused += 1
    graph.lint()
    module.recompile()
    return fused
