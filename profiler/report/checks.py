"""Structural checks: shared/unused modules (:func:`get_module_called_count`) and groups prepare
will not fuse (:func:`check_unfused_operations`, with prepare's own tracer and pattern tables).
Each op's quantization configuration is checked by :mod:`.qconfig_check`.

None of them modifies the model: forward passes run on a deep copy.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from typing import Any, Callable

import pandas as pd
import torch
from qatkit.fake_quantize import FakeQuantize, FakeQuantState, set_fake_quant_state
from qatkit.fx.annotate import is_non_tensor, is_passthrough
from qatkit.fx.fuse import act_kind, find_fusion_groups, is_add  # prepare's own matchers
from qatkit.fx.naming import float_node_names, op_base_name
from qatkit.fx.patterns import (
    BN_FOR,
    FUSED_ACTIVATION_FUNCTIONS,
    NON_TENSOR_FUNCTIONS,
    PASSTHROUGH_FUNCTIONS,
    QUANTIZED_FUNCTIONS,
)
from qatkit.fx.tracer import symbolic_trace
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from ..core.alignment import op_label, trace_model
from ..core.capture import Capture, model_annotations
from ..core.running import positional_inputs, private_copy
from ..core.tables import print_table

__all__ = ["get_module_called_count", "check_unfused_operations"]

CALLED_COUNT_COLUMNS = ["Module Name", "Module Type", "Called Count"]
UNFUSED_COLUMNS = ["Module Name", "Pattern", "Reason", "Fix"]

#: functional forms of weighted layers: never fused (prepare fuses modules only)
_FUNCTIONAL_WEIGHTED = {torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                        torch.nn.functional.conv3d, torch.nn.functional.linear, torch.conv2d}
#: ops seen inside an opaque node (wrapped function, leaf module) that prepare would have fused
_HIDDEN_STAGE = {"batch_norm": "bn", "relu": "act", "relu_": "act", "relu6": "act"}
_NEXT_STAGES = {"weighted": ("bn", "add", "act"), "bn": ("add", "act"), "add": ("act",),
                "act": ()}


# -- shared helpers --------------------------------------------------------------------------
def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return (tuple(example_inputs) if isinstance(example_inputs, (tuple, list))
            else (example_inputs,)), {}


class _Interpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, on_node: Callable) -> None:
        super().__init__(gm)
        self.on_node = on_node

    def run_node(self, n: fx.Node) -> Any:
        return self.on_node(self, n, super().run_node)


def _run_copy(gm: fx.GraphModule, example_inputs: Any, caller: str,
              on_node: Callable[[fx.Interpreter, fx.Node, Callable], Any]) -> None:
    """Run a copy of ``gm`` (eval mode, fake quants in CALIBRATION: float data flow that never
    needs a scale) node by node through ``on_node(interpreter, node, run)``."""
    runner = private_copy(gm).eval()
    if any(isinstance(m, FakeQuantize) for m in runner.modules()):
        set_fake_quant_state(runner, FakeQuantState.CALIBRATION)
    try:
        with torch.no_grad():
            _Interpreter(runner, on_node).run(*positional_inputs(runner, example_inputs))
    except Exception as e:
        raise RuntimeError(f"{caller}: running example_inputs through {type(gm).__name__} "
                           f"failed: {type(e).__name__}: {e}") from e


# -- get_module_called_count ---------------------------------------------------------------
def _default_leaf(module: nn.Module) -> bool:
    """No children, or a qatkit QAT / quantized module (its fake quants are not counted)."""
    return (getattr(module, "_qatkit_leaf", False) or hasattr(module, "weight_fake_quant")
            or hasattr(module, "activation_post_process") or isinstance(module, FakeQuantize)
            or next(module.children(), None) is None)


def _leaf_modules(model: nn.Module, is_leaf: Callable[[nn.Module], bool]
                  ) -> list[tuple[str, nn.Module]]:
    """Leaf modules by qualified name, outermost leaf wins, each instance once."""
    out: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(prefix: str, mod: nn.Module) -> None:
        for child_name, child in mod.named_children():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            name = f"{prefix}.{child_name}" if prefix else child_name
            if is_leaf(child):
                out.append((name, child))
            else:
                visit(name, child)

    visit("", model)
    return out


def get_module_called_count(model: nn.Module, example_inputs: Any,
                            check_leaf_module: Callable[[nn.Module], bool] | None = None,
                            print_tabulate: bool = True,
                            capture: Capture | None = None) -> pd.DataFrame:
    """Count how often each leaf module is called in one forward pass.

    A module called more than once shares one output scale over its calls and is not fused;
    one called zero times is unused. Works for float, prepared and converted models; the model
    is not modified (a deep copy runs, in eval mode, without gradients).

    Args:
        model: any ``nn.Module``.
        example_inputs: the forward's positional arguments (a tuple, or one tensor), or a dict
            of keyword arguments (unused with ``capture``).
        check_leaf_module: ``callable(module) -> bool`` choosing the modules to count; the
            default counts modules without children and qatkit's QAT / quantized modules
            (whose fake quants are not counted separately).
        print_tabulate: print the table, shared and unused modules marked.
        capture: a :class:`~qatkit.profiler.core.capture.Capture` of ``model``
            (:func:`~qatkit.profiler.core.capture.capture_model`): its call counts are read and the
            model does not run again (as in :func:`~qatkit.profiler.model_profiler`).

    Returns:
        DataFrame with columns "Module Name", "Module Type", "Called Count", in module order.

    Raises:
        RuntimeError: the forward pass failed (the message says which model and why).
        ValueError: ``capture`` was recorded from another model.

    Example::

        >>> df = get_module_called_count(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        >>> df.set_index("Module Name").loc["layer1.0.relu", "Called Count"]
        2
    """
    is_leaf = check_leaf_module or _default_leaf
    leaves = _leaf_modules(model, is_leaf)
    if capture is not None:
        capture.check_model(model, "get_module_called_count")
        counts = {name: capture.calls.get(name, 0) for name, _ in leaves}
    else:
        counts = _run_counting(model, example_inputs, [name for name, _ in leaves])
    df = pd.DataFrame([(name, mod._get_name(), counts[name]) for name, mod in leaves],
                      columns=CALLED_COUNT_COLUMNS)
    if print_tabulate:
        notes = ["<-- shared" if c > 1 else "<-- unused" if c == 0 else ""
                 for c in df["Called Count"]]
        print_table("module called count", df, notes)
    return df


def _run_counting(model: nn.Module, example_inputs: Any, names: list[str]) -> dict[str, int]:
    """Calls of the modules ``names`` in one forward of a deep copy of ``model``."""
    counts = {name: 0 for name in names}
    args, kwargs = _split_inputs(example_inputs)
    runner = private_copy(model).eval()
    if any(isinstance(m, FakeQuantize) for m in runner.modules()):  # never needs a scale
        set_fake_quant_state(runner, FakeQuantState.CALIBRATION)
    copies = dict(runner.named_modules(remove_duplicate=False))
    handles = []
    try:
        for name in counts:
            handles.append(copies[name].register_forward_hook(
                lambda *_, n=name: counts.update({n: counts[n] + 1})))
        with torch.no_grad():
            runner(*args, **kwargs)
    except Exception as e:
        raise RuntimeError(f"get_module_called_count: running {type(model).__name__} on "
                           f"example_inputs failed: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
    return counts


# -- check_unfused_operations ----------------------------------------------------------------
def _is_opaque(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A wrapped function or a custom leaf module: prepare cannot see inside."""
    if node.op == "call_function":
        known = (QUANTIZED_FUNCTIONS, FUSED_ACTIVATION_FUNCTIONS, PASSTHROUGH_FUNCTIONS,
                 NON_TENSOR_FUNCTIONS, _FUNCTIONAL_WEIGHTED)
        return not any(node.target in table for table in known)
    if node.op == "call_module":
        return not type(modules[node.target]).__module__.startswith("torch.")
    return False


def _stage(node: fx.Node, wmod: nn.Module | None, modules: dict[str, nn.Module],
           hidden: dict[fx.Node, str]) -> str | None:
    """Which fusable stage ``node`` would be after weighted module ``wmod`` (None: none)."""
    if node.op == "call_module":  # after a functional conv (wmod None): any BatchNorm
        bn, out_ch = modules[node.target], getattr(wmod, "out_features", None) or getattr(
            wmod, "out_channels", None)
        allowed = nn.modules.batchnorm._BatchNorm if wmod is None else BN_FOR.get(type(wmod), ())
        if isinstance(bn, allowed) and (wmod is None or bn.num_features == out_ch):
            return "bn"
    if is_add(node):
        return "add"
    if act_kind(node, modules) is not None:
        return "act"
    return hidden.get(node)


class _Spy(TorchFunctionMode):
    """Records the first bn/relu applied to tensor ``inp`` inside an opaque op."""

    def __init__(self, inp: Any) -> None:
        super().__init__()
        self.inp, self.stage = inp, None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = getattr(func, "__name__", "")
        if self.stage is None and args and args[0] is self.inp and name in _HIDDEN_STAGE:
            self.stage = _HIDDEN_STAGE[name]
        return func(*args, **(kwargs or {}))


def _hidden_ops(gm: fx.GraphModule, candidates: set[fx.Node], example_inputs: Any
                ) -> dict[fx.Node, str]:
    """For each opaque candidate node, the fusable stage (bn/act) it applies to its input,
    observed by running ``example_inputs`` through the traced model."""
    if not candidates or example_inputs is None:
        return {}
    wanted = {n.name: n for n in candidates}
    found: dict[fx.Node, str] = {}

    def on_node(interp: fx.Interpreter, n: fx.Node, run: Callable) -> Any:
        if n.name not in wanted:
            return run(n)
        args, _ = interp.fetch_args_kwargs_from_env(n)
        with _Spy(args[0] if args else None) as spy:
            value = run(n)
        if spy.stage is not None:
            found[wanted[n.name]] = spy.stage
        return value

    _run_copy(gm, example_inputs, "check_unfused_operations", on_node)
    return found


def _follow(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[fx.Node], list[fx.Node],
                                                                  list[fx.Node]]:
    """(tensor users, passthrough chain, non-tensor users) of ``node``: when its only tensor
    user is a data-moving op with one tensor user, and so on, the chain is followed."""
    users = list(node.users)
    tensor_users = [u for u in users if not is_non_tensor(u)]
    chain: list[fx.Node] = []
    cur = tensor_users
    while len(cur) == 1 and is_passthrough(cur[0], modules):
        chain.append(cur[0])
        cur = [u for u in cur[0].users if not is_non_tensor(u)]
    return cur, chain, [u for u in users if is_non_tensor(u)]


def _unfused_rows(gm: fx.GraphModule, names: dict[fx.Node, str], example_inputs: Any
                  ) -> list[tuple[str, str, str, str]]:
    modules = dict(gm.named_modules())
    labels = {n: op_label(ann, modules) for n, ann in model_annotations(gm).items()}
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prepare's own warnings; reported as rows here
        groups = find_fusion_groups(gm)
    claimed = {n for g in groups for n in g.nodes}
    starts: list[tuple[fx.Node, str, nn.Module | None, list[fx.Node]]] = []
    for g in groups:
        stage = "act" if g.act else "add" if g.add else "bn" if g.bn else "weighted"
        starts.append((g.last, stage, modules[g.weighted.target], g.nodes))
    for node in gm.graph.nodes:  # functional conv/linear: not a module, never fused
        if node.op == "call_function" and node.target in _FUNCTIONAL_WEIGHTED:
            starts.append((node, "weighted", None, [node]))
    follows = {last: _follow(last, modules) for last, *_ in starts}
    opaque = {u for users, _, _ in follows.values() for u in users if _is_opaque(u, modules)}
    hidden = _hidden_ops(gm, opaque, example_inputs)
    rows = []
    for last, stage, wmod, nodes in starts:
        users, chain, non_tensor = follows[last]
        weighted = nodes[0]
        for user in users:
            nxt = _stage(user, wmod, modules, hidden)
            if nxt not in _NEXT_STAGES[stage] or user in claimed or (
                    nxt == "add" and len(users) > 1):  # the identity side of a residual
                continue
            reason = _why_unfused(weighted, last, user, nxt, chain, users, non_tensor,
                                  wmod, calls, names, labels, modules)
            if reason is None:  # not a pattern prepare could fuse (x + x, x + constant, ...)
                continue
            mods = ", ".join(names[n] for n in nodes + chain + [user])
            pattern = " + ".join(labels[n] for n in nodes + chain + [user])
            rows.append((mods, pattern, *reason))
    return rows


def _why_unfused(weighted: fx.Node, last: fx.Node, user: fx.Node, nxt: str,
                 chain: list[fx.Node], users: list[fx.Node], non_tensor: list[fx.Node],
                 wmod: nn.Module | None, calls: Counter, names: dict[fx.Node, str],
                 labels: dict[fx.Node, str], modules: dict[str, nn.Module]
                 ) -> tuple[str, str] | None:
    w, lst, u = names[weighted], names[last], names[user]
    if wmod is None:
        return (f"'{w}' is a functional {op_base_name(weighted)}() call, not a module: prepare "
                "fuses and quantizes only nn.Conv*/nn.Linear modules, so it stays float",
                f"replace the functional call with an nn.{'Linear' if 'linear' in w else 'Conv2d'} "
                f"module (weights as its parameters) so '{w}' and '{u}' fuse")
    if calls[weighted.target] > 1:
        return (f"'{weighted.target}' is called {calls[weighted.target]} times (shared weights): "
                "prepare never fuses a shared weighted module, and all its calls share one "
                "output scale",
                f"give each call site its own module (e.g. self.{weighted.target}_2 = "
                f"copy.deepcopy(self.{weighted.target})) unless the weights must stay tied")
    if user.op == "call_module" and nxt == "bn" and calls[user.target] > 1:
        return (f"BatchNorm '{user.target}' is called {calls[user.target]} times: a shared "
                "BatchNorm is not fused into any layer",
                f"give each conv/linear its own BatchNorm instead of sharing '{user.target}'")
    if _is_opaque(user, modules):
        what = (f"leaf module '{user.target}' ({type(modules[user.target]).__name__})"
                if user.op == "call_module" else f"wrapped function {op_base_name(user)}()")
        kind = "BatchNorm" if nxt == "bn" else "ReLU"
        return (f"its {kind} runs inside {what}, which prepare does not trace into",
                f"call the {kind} in the traced forward (outside {what}), or move '{w}' into "
                "the same leaf")
    if chain:
        moves = ", ".join(f"'{names[n]}' ({labels[n]})" for n in chain)
        why = (f"{moves} between '{lst}' and '{u}' splits the pattern: prepare fuses only "
               "directly connected ops")
        if any("dropout" in labels[n].lower() or "stochastic" in labels[n].lower()
               for n in chain):
            return why, (f"{moves} is an identity at inference: leave it out of the forward "
                         "used for quantization (e.g. behind a flag), or for a dropout before a "
                         f"ReLU apply it after '{u}'")
        return why, (f"apply '{u}' before {moves} (BatchNorm/ReLU commute with reshapes that "
                     f"keep the channel axis), or move the reshape before '{w}'")
    others = [names[n] for n in users if n is not user]
    if non_tensor or others:
        fix = (f"read the shape from the input of '{w}' instead of from '{lst}'" if not others
               else f"if {others} can take the output of '{u}' instead, pass them that")
        return (f"the output of '{lst}' is also used by {others + [names[n] for n in non_tensor]}"
                ": prepare fuses only a result used once", fix)
    return None


def check_unfused_operations(model: nn.Module, example_inputs: Any = None,
                             print_tabulate: bool = True,
                             prepare_custom_config_dict: dict | None = None) -> pd.DataFrame:
    """List the conv/linear + bn/add/relu groups of a float model that prepare will not fuse.

    Each unfused op adds a quantization step and an NPU op. The model is traced and matched
    with prepare's own tracer and pattern tables, so a reported group is one prepare leaves
    unfused: shared conv/linear or BatchNorm, a pattern split by a reshape/dropout, a result
    used twice, a BatchNorm/ReLU inside a wrapped function or leaf module (seen by running
    ``example_inputs``), a functional ``F.conv2d``. See docs/profiler_checks.md.

    Args:
        model: the float model (not prepared).
        example_inputs: the forward's arguments (tuple, one tensor, or dict of keywords);
            needed to look inside wrapped functions and leaf modules (None: skip that).
        print_tabulate: print the table.
        prepare_custom_config_dict: the same tracing options given to prepare
            (``concrete_args``, ``leaf_module_types``, ``leaf_module_names``,
            ``wrapped_functions``).

    Returns:
        DataFrame with columns "Module Name" (the group's float names, comma-separated, in
        data order),
        "Pattern" (their types), "Reason", "Fix"; empty when everything fuses.

    Example::

        >>> check_unfused_operations(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
        Empty DataFrame ...
    """
    custom = dict(prepare_custom_config_dict or {})
    traced = None
    if not custom and not isinstance(model, fx.GraphModule):
        with contextlib.suppress(ValueError):  # the trace model_profiler's tools share
            traced = trace_model(model)
    gm = traced or symbolic_trace(model, concrete_args=custom.get("concrete_args"),
                                  leaf_modules=custom.get("leaf_module_types", ()),
                                  leaf_module_names=custom.get("leaf_module_names", ()),
                                  wrapped_functions=custom.get("wrapped_functions", ()))
    names = float_node_names(gm)
    df = pd.DataFrame(_unfused_rows(gm, names, example_inputs), columns=UNFUSED_COLUMNS)
    if print_tabulate:
        print_table("unfused operations", df)
    return df


# -- check_qconfig ---------------------------------------------------------------------------
