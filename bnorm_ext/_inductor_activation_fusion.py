"""BatchNorm -> activation fusion under torch.compile (Inductor): a pre-grad
graph pass that makes our BatchNorm op followed by relu / leaky_relu / silu,
or by an add and then such an activation, one fused
`batch_norm_act_forward_{train,eval}` call.

The pass runs on the Dynamo graph (before AOTAutograd), so AOTAutograd traces
the fused op's own autograd kernel and the backward is fused too. Only the
bnorm_ext ops are rewritten (torch's BatchNorm is left to Inductor); a graph
without them is left as it is. `enable_inductor_fusion()` switches it on.
"""

import operator
from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fx_activation_fusion import _activation_of, _residual_of

_OPS = torch.ops.bnorm_ext
_TRAIN = (_OPS.batch_norm_forward_train, _OPS.batch_norm_forward_train.default)
_EVAL = (_OPS.batch_norm_forward_eval, _OPS.batch_norm_forward_eval.default)
_ATEN = torch.ops.aten


def _example(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _same_tensor_type(a: Any, b: Any) -> bool:
    # The fused ops take a residual of the input's shape, dtype and device.
    # NB: with dynamic shapes only sizes known equal without a new guard count.
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.dim() == b.dim()
        and all(statically_known_true(m == n) for m, n in zip(a.shape, b.shape))
        and a.dtype == b.dtype
        and a.device == b.device
    )


def _bound_args(node: fx.Node, op: torch._ops.OpOverload) -> Optional[Dict[str, Any]]:
    # The call's arguments by schema name, or None if they do not bind.
    names = [a.name for a in op._schema.arguments]
    if len(node.args) > len(names):
        return None
    bound = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names or key in bound:
            return None
        bound[key] = value
    return bound if len(bound) == len(names) else None


def _flat_nodes(args: Any) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


class _Match:
    # One BatchNorm -> [add ->] activation chain of the graph.
    def __init__(self, bn, out, add, act, residual, activation, slope):
        self.bn, self.out, self.add, self.act = bn, out, add, act
        self.residual, self.activation, self.slope = residual, activation, slope


def _plain_op(bn: fx.Node) -> torch._ops.OpOverload:
    return _OPS.batch_norm_forward_train.default if bn.target in _TRAIN else _OPS.batch_norm_forward_eval.default


def _match(bn: fx.Node) -> Optional[_Match]:
    # The chain starting at our BatchNorm op `bn`, if every intermediate value
    # has exactly one user; else None.
    training = bn.target in _TRAIN
    if _bound_args(bn, _plain_op(bn)) is None:
        return None
    if training:
        if len(bn.users) != 1:
            return None
        (out,) = bn.users
        if out.op != "call_function" or out.target is not operator.getitem or out.args != (bn, 0):
            return None
    else:
        out = bn
    if len(out.users) != 1:
        return None
    (user,) = out.users
    add, residual = None, None
    found = _activation_of(user)
    if found is None:
        residual = _residual_of(user, out)
        if residual is None or len(user.users) != 1:
            return None
        add = user
        (user,) = add.users
        found = _activation_of(user)
    if found is None or found[0] is not (add if add is not None else out):
        return None
    if _flat_nodes((user.args, user.kwargs)).count(found[0]) != 1:
        return None
    if residual is not None and not _same_tensor_type(_example(residual), _example(out)):
        return None
    return _Match(bn, out, add, user, residual, found[1], found[2])


def _moves_safely(m: _Match) -> bool:
    # With an add, the fused call runs where the add did, so it reads the
    # residual where the add read it; the BatchNorm then runs later, so no node
    # in between may take any of its arguments (it could write the input or
    # read the running statistics the BatchNorm updates).
    if m.add is None:
        return True
    bn_inputs = set(_flat_nodes((m.bn.args, m.bn.kwargs)))
    node = m.bn.next
    while node is not m.add:
        if bn_inputs.intersection(_flat_nodes((node.args, node.kwargs))):
            return False
        node = node.next
    return True


def _rewrite(graph: fx.Graph, m: _Match) -> None:
    # Replaces the chain by one fused call (and its getitem when training) at
    # the add, or at the BatchNorm when there is no add.
    training = m.bn.target in _TRAIN
    fused_op = _OPS.batch_norm_act_forward_train.default if training else _OPS.batch_norm_act_forward_eval.default
    bound = _bound_args(m.bn, _plain_op(m.bn))
    bound.update(residual=m.residual, activation=m.activation, negative_slope=m.slope)
    args = tuple(bound[a.name] for a in fused_op._schema.arguments)
    with graph.inserting_before(m.add if m.add is not None else m.bn):
        fused = graph.call_function(fused_op, args)
        result = graph.call_function(operator.getitem, (fused, 0)) if training else fused
    fused.meta.update(m.bn.meta)
    if training:
        result.meta.update(m.out.meta)
        example = _example(m.bn)
        if isinstance(example, (tuple, list)) and "example_value" in fused.meta:
            fused.meta["example_value"] = (_example(m.act), *example[1:])
    if "example_value" in m.act.meta:
        result.meta["example_value"] = m.act.meta["example_value"]
    m.act.replace_all_uses_with(result)
    for node in (m.act, m.add, m.out if training else None, m.bn):
        if node is not None:
            graph.erase_node(node)


def fuse_batch_norm_activations(graph: fx.Graph) -> int:
    """Rewrites every bnorm_ext BatchNorm op of `graph` whose output's only
    user is a relu / leaky_relu (negative_slope >= 0) / silu, or an add whose
    only user is such an activation, into the fused op; returns the number
    of fused calls."""
    candidates = [n for n in graph.nodes if n.op == "call_function" and (n.target in _TRAIN or n.target in _EVAL)]
    fused = 0
    for bn in candidates:
        m = _match(bn)
        if m is None:
            continue
        if not _moves_safely(m):
            continue
        _rewrite(graph, m)
        fused += 1
    return fused


class _PassChain(CustomGraphPass):
    """Several pre-grad passes as one, run in order, for a torch whose
    config.pre_grad_custom_pass holds a single callable (2.11); its uuid
    combines the passes' (None if one has none, as Inductor does)."""

    def __init__(self, passes: List[Any]) -> None:
        self.passes = tuple(passes)

    def __call__(self, graph: fx.Graph) -> None:
        for p in self.passes:
            p(graph)

    def uuid(self) -> Optional[bytes]:
        uuids = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in self.passes]
        if any(u is None for u in uuids):
            return None
        return b"".join(u if isinstance(u, bytes) else str(u).encode() for u in uuids)


try:
    # Newer torch (2.14): pre_grad_custom_pass may be a list of passes.
    from torch._inductor.custom_graph_pass import get_custom_graph_passes

    CONFIG_TAKES_PASS_LIST = True
except ImportError:
    CONFIG_TAKES_PASS_LIST = False

    def get_custom_graph_passes(custom_pass: Any) -> tuple:
        """The passes in a config value: None, one pass, a list/tuple or our chain."""
        if custom_pass is None:
            return ()
        if isinstance(custom_pass, _PassChain):
            return custom_pass.passes
        if isinstance(custom_pass, (list, tuple)):
            return tuple(custom_pass)
        return (custom_pass,)


class BatchNormActivationFusion(CustomGraphPass):
    """The pass as an Inductor pre-grad custom pass; its uuid (a hash of this
    file) keys Inductor's FX graph cache."""

    def __call__(self, graph: fx.Graph) -> None:
        fuse_batch_norm_activations(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))


FUSION_PASS = BatchNormActivationFusion()


def enable_inductor_fusion(enabled: bool = True) -> None:
    """Adds the pass to torch._inductor.config.pre_grad_custom_pass after the
    passes already there (enabled=True; once only), or removes it. The config
    holds one pass as itself and several as a list (as a _PassChain where
    torch takes one callable only)."""
    from torch._inductor import config

    current = config.pre_grad_custom_pass
    passes = [p for p in get_custom_graph_passes(current) if not isinstance(p, BatchNormActivationFusion)]
    if enabled:
        passes.append(FUSION_PASS)
    if len(passes) > 1:
        config.pre_grad_custom_pass = passes if CONFIG_TAKES_PASS_LIST else _PassChain(passes)
    else:
        config.pre_grad_custom_pass = passes[0] if passes else None
