"""Conv/Linear + BatchNorm fusion for deployment, for bnorm_ext's modules as for torch's.

- torch.ao.quantization.fuse_modules / fuse_modules_qat look fuser methods up by
  the exact tuple of module types; `import bnorm_ext` adds a row for each of
  torch's rows that has a BatchNorm, with our class in its place.
- torch.fx.experimental.optimization.fuse matches `type(m) is nn.BatchNorm2d`
  against a pattern list local to the function, so it cannot be taught:
  `fuse_conv_bn` is that pass matching torch's classes and ours.
- torch.nn.utils.fusion.fuse_conv_bn_eval / fuse_linear_bn_eval read only the
  BatchNorm's attributes and take our modules as they are.
"""

import copy

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .modules import _TO_OURS, _TO_TORCH, BatchNorm1d, BatchNorm2d, BatchNorm3d

# (preceding layer, BatchNorm classes), in the order torch's fuse tries them.
_FUSE_PATTERNS = [
    (nn.Conv1d, (nn.BatchNorm1d, BatchNorm1d)),
    (nn.Conv2d, (nn.BatchNorm2d, BatchNorm2d)),
    (nn.Conv3d, (nn.BatchNorm3d, BatchNorm3d)),
    (nn.Linear, (nn.BatchNorm1d, BatchNorm1d)),
]


def _module_of(node, modules):
    if isinstance(node, fx.Node) and node.op == "call_module" and isinstance(node.target, str):
        return modules.get(node.target)
    return None


def _parent_name(target: str):
    *parent, name = target.rsplit(".", 1)
    return parent[0] if parent else "", name


def fuse_conv_bn(model: nn.Module, inplace: bool = False, no_trace: bool = False) -> fx.GraphModule:
    """torch.fx.experimental.optimization.fuse for models with bnorm_ext's BatchNorm:
    folds each eval-mode BatchNorm (torch's or ours) into the Conv1d/2d/3d or Linear
    that feeds only it, and returns the FX GraphModule. Same arguments and result
    as torch's pass (which matches torch's BatchNorm classes by exact type only)."""
    if not inplace:
        model = copy.deepcopy(model)
    if not no_trace or not isinstance(model, fx.GraphModule):
        fx_model = fx.symbolic_trace(model)  # our BatchNorm modules trace as leaves, like torch's
    else:
        fx_model = model
    modules = dict(fx_model.named_modules())
    new_graph = copy.deepcopy(fx_model.graph)

    for first_type, bn_types in _FUSE_PATTERNS:
        for node in new_graph.nodes:
            bn = _module_of(node, modules)
            if type(bn) not in bn_types or len(node.args) == 0:
                continue
            first_node = node.args[0]
            first_layer = _module_of(first_node, modules)
            if type(first_layer) is not first_type:
                continue
            if len(first_node.users) > 1:
                # the conv/linear output is used elsewhere too
                continue
            if not bn.track_running_stats:
                continue
            if first_type is nn.Linear:
                fused_layer = fuse_linear_bn_eval(first_layer, bn)
            else:
                fused_layer = fuse_conv_bn_eval(first_layer, bn)
            parent_name, name = _parent_name(first_node.target)
            modules[first_node.target] = fused_layer
            setattr(modules[parent_name], name, fused_layer)
            node.replace_all_uses_with(first_node)
            new_graph.erase_node(node)
    return fx.GraphModule(fx_model, new_graph)


def _with_torch_batchnorm(fuser_method):
    # torch.ao.nn.intrinsic modules (QAT ConvBn*, BNReLU*) require torch's exact class:
    # the BatchNorm being fused becomes torch's class in place (state, hooks and mode kept).
    def fuser_method_for_bnorm_ext(is_qat, *mods):
        for mod in mods:
            torch_class = _TO_TORCH.get(type(mod))
            if torch_class is not None:
                mod.__class__ = torch_class
        return fuser_method(is_qat, *mods)

    return fuser_method_for_bnorm_ext


def _register_quantization_fuser_methods() -> None:
    try:
        from torch.ao.quantization import fuser_method_mappings
    except ImportError:  # a torch without torch.ao.quantization has no fuse_modules to teach
        return
    table = getattr(fuser_method_mappings, "_DEFAULT_OP_LIST_TO_FUSER_METHOD", None)
    if table is None:
        return
    for types, fuser_method in list(table.items()):
        if not any(t in _TO_OURS for t in types):
            continue
        ours = tuple(_TO_OURS.get(t, t) for t in types)
        if ours not in table:
            table[ours] = _with_torch_batchnorm(fuser_method)


def register() -> None:
    """Teaches torch.ao.quantization.fuse_modules(_qat) our classes; called by `import bnorm_ext`."""
    _register_quantization_fuser_methods()
