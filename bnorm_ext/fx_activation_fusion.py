"""Eager fusion of BatchNorm -> activation and BatchNorm -> add -> activation
into BatchNormAct2d calls: `fuse_activations(model)`."""

import copy
import operator
from typing import Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .activation import BatchNormAct2d
from .modules import BatchNorm2d

# BatchNorm classes that become BatchNormAct2d (exact types: subclasses such as
# SyncBatchNorm may mean something else).
_FUSABLE_BN = (nn.BatchNorm2d, BatchNorm2d)

_ACT_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.SiLU: "silu"}
_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_, torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
_SILU_FUNCTIONS = (F.silu, torch.ops.aten.silu.default, torch.ops.aten.silu_.default)
_LEAKY_RELU_FUNCTIONS = (
    F.leaky_relu,
    F.leaky_relu_,
    torch._C._nn.leaky_relu,
    torch._C._nn.leaky_relu_,
    torch.ops.aten.leaky_relu.default,
    torch.ops.aten.leaky_relu_.default,
)
_ADD_FUNCTIONS = (operator.add, torch.add, torch.ops.aten.add.Tensor)
# NB: in-place adds write into their first operand, so it must be the BatchNorm's output.
_ADD_INPLACE_FUNCTIONS = (operator.iadd, torch.ops.aten.add_.Tensor)


# NB: our BatchNorm modules (and BatchNormAct2d) record themselves as
# call_module leaves (modules._fx_leaf_call), so a plain fx.Tracer suffices.
class _FusionTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) is BatchNormAct2d or super().is_leaf_module(m, module_qualified_name)


def _only_kwargs(node: fx.Node, allowed: Tuple[str, ...]) -> bool:
    return all(k in allowed for k in node.kwargs)


def _activation_of(node: fx.Node, modules=None) -> Optional[Tuple[fx.Node, str, float]]:
    # (input node, activation, negative_slope) when `node` applies a fusable
    # activation to one tensor, in place or not; else None. `modules`: the
    # graph's submodules by name, for call_module nodes (module-level graphs).
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    x = node.args[0]
    if node.op == "call_module" and modules is not None:
        module = modules.get(node.target)
        act = _ACT_MODULES.get(type(module))
        if act is None or len(node.args) != 1 or node.kwargs:
            return None
        slope = float(module.negative_slope) if act == "leaky_relu" else 0.0
        return (x, act, slope) if slope >= 0.0 else None
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
            return x, "relu", 0.0
        return None
    if node.op != "call_function":
        return None
    if node.target in _RELU_FUNCTIONS and len(node.args) <= 2 and _only_kwargs(node, ("inplace",)):
        return x, "relu", 0.0
    if node.target in _SILU_FUNCTIONS and len(node.args) <= 2 and _only_kwargs(node, ("inplace",)):
        return x, "silu", 0.0
    if (
        node.target in _LEAKY_RELU_FUNCTIONS
        and len(node.args) <= 3
        and _only_kwargs(node, ("negative_slope", "inplace"))
    ):
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        if isinstance(slope, (int, float)) and not isinstance(slope, bool) and slope >= 0:
            return x, "leaky_relu", float(slope)
    return None


def _residual_of(node: fx.Node, bn_out: fx.Node) -> Optional[fx.Node]:
    # The other operand when `node` is bn_out + other (either order; +, +=,
    # torch.add, Tensor.add / add_) without alpha; else None.
    if node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        pass
    elif node.op == "call_method" and node.target == "add":
        pass
    elif (node.op == "call_function" and node.target in _ADD_INPLACE_FUNCTIONS) or (
        node.op == "call_method" and node.target == "add_"
    ):
        if a is not bn_out:
            return None
    else:
        return None
    other = b if a is bn_out else a if b is bn_out else None
    if not isinstance(other, fx.Node) or other is bn_out:
        return None
    return other


def fuse_activations(model: nn.Module, inplace: bool = False) -> fx.GraphModule:
    """Traces `model` with FX and makes every 2-d BatchNorm (torch's or
    bnorm_ext's) whose only user is a ReLU / LeakyReLU (negative_slope >= 0) /
    SiLU, module or functional, in place or not, or an add whose only user is
    such an activation, one BatchNormAct2d call. The BatchNorm module becomes a
    BatchNormAct2d in place (same parameters and buffers, so state_dict keys are
    unchanged). A BatchNorm whose output has another user, or whose module is
    called more than once, stays as it is. Returns the GraphModule; `model` is
    copied first unless inplace=True."""
    if not inplace:
        model = copy.deepcopy(model)
    tracer = _FusionTracer()
    # NB: the GraphModule is built from the graph as traced, so its submodules
    # (and state_dict keys) keep their order when a fused call moves later.
    traced = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, traced, model.__class__.__name__)
    graph = gm.graph
    modules = dict(gm.named_modules())
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    order = {node: i for i, node in enumerate(graph.nodes)}
    for bn in list(graph.nodes):
        if bn.op != "call_module" or type(modules.get(bn.target)) not in _FUSABLE_BN:
            continue
        if calls[bn.target] != 1 or len(bn.args) != 1 or bn.kwargs or len(bn.users) != 1:
            continue
        (user,) = bn.users
        removed = [user]
        residual = None
        found = _activation_of(user, modules)
        if found is None:
            residual = _residual_of(user, bn)
            if residual is None or len(user.users) != 1:
                continue
            (act_node,) = user.users
            found = _activation_of(act_node, modules)
            if found is None or found[0] is not user:
                continue
            removed = [act_node, user]
        _, activation, slope = found
        # The fused call computes where BN did, or after the residual if that comes later.
        where = bn if residual is None or order[residual] < order[bn] else removed[0]
        with graph.inserting_before(where):
            args = (bn.args[0],) if residual is None else (bn.args[0], residual)
            fused = graph.call_module(bn.target, args)
        order[fused] = order[where] - 0.5  # a later fusion may take it as its residual
        removed[0].replace_all_uses_with(fused)
        for node in removed:
            graph.erase_node(node)
        graph.erase_node(bn)
        module = modules[bn.target]
        module.__class__ = BatchNormAct2d
        module.activation = activation
        module.negative_slope = slope
    graph.lint()
    gm.recompile()
    return gm
