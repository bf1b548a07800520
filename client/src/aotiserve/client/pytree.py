"""A model's call structure, as torch's loaded package has it (``AOTICompiledModel.__call__``).

A ``.pt2`` records how its flat inputs and outputs nest: the pytree specs of ``(args, kwargs)``
and of the result, serialized by ``torch.utils._pytree.treespec_dumps`` (``get_call_spec``).
This module reads them without torch: it flattens a call's ``(args, kwargs)`` along the input
spec, checking that the structure is the one the model was exported with, and nests the flat
outputs back along the output spec. Tuples, lists, dicts, ``OrderedDict``, ``defaultdict``,
named tuples and deques are understood here; a spec with other node types (types registered
with torch's pytree) is handed to torch's own pytree when torch is importable.

As in torch, leaves that are not tensors (numbers, strings, None: values the export
specialized on) are dropped from the inputs; numpy arrays and scalars and torch tensors are
tensors.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_SEQUENCES = {
    "builtins.tuple": tuple,
    "builtins.list": list,
    "collections.namedtuple": tuple,  # the type is named, not described: a plain tuple
    "collections.deque": collections.deque,
}
_MAPPINGS = {
    "builtins.dict": dict,
    "collections.OrderedDict": collections.OrderedDict,
    "collections.defaultdict": dict,
}


@dataclass
class Spec:
    """One node of a serialized pytree spec: a leaf (``type`` None) or a container."""

    type: str | None
    context: Any = None
    children: list[Spec] = field(default_factory=list)
    source: str = ""  # the root's serialized text (for torch's pytree)

    @property
    def is_leaf(self) -> bool:
        return self.type is None

    @property
    def leaves(self) -> int:
        return 1 if self.is_leaf else sum(c.leaves for c in self.children)

    def known(self) -> bool:
        """Whether every node is a type this module reads (else torch's pytree is needed)."""
        if self.is_leaf:
            return True
        return (self.type in _SEQUENCES or self.type in _MAPPINGS) and all(
            c.known() for c in self.children
        )


def _node(obj: Any) -> Spec:
    if not isinstance(obj, Mapping) or "children_spec" not in obj:
        raise ValueError(f"not a pytree spec node: {obj!r:.80}")
    children = [_node(c) for c in obj["children_spec"]]
    typ = obj.get("type")
    if typ is None:
        return Spec(None)
    raw = obj.get("context")
    context: Any = raw
    if typ in _MAPPINGS:
        loaded = json.loads(raw) if isinstance(raw, str) else raw
        if typ == "collections.defaultdict":  # {"default_factory_...": ..., "dict_context": keys}
            loaded = loaded.get("dict_context", []) if isinstance(loaded, Mapping) else loaded
        context = list(loaded or [])
        if len(context) != len(children):
            raise ValueError(f"{typ} spec names {len(context)} keys for {len(children)} children")
    return Spec(typ, context, children)


def loads(text: str) -> Spec | None:
    """The spec ``treespec_dumps`` wrote (``[protocol, node]``); None for an empty string."""
    if not text:
        return None
    loaded = json.loads(text)
    if not (isinstance(loaded, list) and len(loaded) == 2 and loaded[0] == 1):
        raise ValueError(f"unknown pytree spec format (protocol 1 expected): {text[:80]!r}")
    root = _node(loaded[1])
    root.source = text
    return root


class SpecMismatch(ValueError):
    """The model gave other outputs than its output spec describes."""


def load_specs(call_spec: Sequence[str]) -> tuple[Spec | None, Spec | None]:
    """``get_call_spec()``'s ``[in_spec, out_spec]``, read."""
    return loads(call_spec[0]), loads(call_spec[1])


def is_tensor(value: Any) -> bool:
    if isinstance(value, (np.ndarray, np.generic)):
        return True
    return type(value).__module__.startswith("torch") and hasattr(value, "dtype")


def _where(path: str) -> str:
    return path or "the arguments"


def _key_difference(want: list, given: Any) -> str | None:
    """ "missing [...], unexpected [...]" between the keys a spec names and those given."""
    if set(given) == set(want):
        return None
    missing = [k for k in want if k not in given]
    extra = sorted((k for k in given if k not in want), key=repr)
    parts = [f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else ""]
    return ", ".join(p for p in parts if p)


def _flatten(value: Any, spec: Spec, path: str, out: list) -> None:
    if spec.is_leaf:
        # A leaf is a tensor or a constant the model was exported with (a number, None, a
        # string); a container there would be dropped as "not a tensor" and the call sent
        # one input short.
        if isinstance(value, Mapping) or (
            isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        ):
            raise TypeError(
                f"{_where(path)}: expected a tensor, got a {type(value).__name__} "
                "(the model takes one tensor here)"
            )
        out.append(value)
        return
    if spec.type in _MAPPINGS:
        if not isinstance(value, Mapping):
            raise TypeError(f"{_where(path)}: expected a mapping, got {type(value).__name__}")
        want = spec.context
        differ = _key_difference(want, value)
        if differ:
            raise TypeError(f"{_where(path)}: keys {list(want)} expected; {differ}")
        for key, child in zip(want, spec.children):
            _flatten(value[key], child, f"{path}[{key!r}]", out)
        return
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{_where(path)}: expected a sequence, got {type(value).__name__}")
    if len(value) != len(spec.children):
        raise TypeError(f"{_where(path)}: expected {len(spec.children)} items, got {len(value)}")
    for i, (item, child) in enumerate(zip(value, spec.children)):
        _flatten(item, child, f"{path}[{i}]", out)


def flatten_call(spec: Spec | None, args: tuple, kwargs: dict) -> list:
    """The model's flat tensor inputs for a call ``model(*args, **kwargs)``.

    Raises TypeError naming where the call's structure differs from the model's.
    """
    if spec is None:  # a package with no call spec: positional tensors, as ``run`` takes them
        if kwargs:
            raise TypeError(
                f"keyword arguments {sorted(kwargs)} given, but the model records no call "
                "structure (no call spec): pass its inputs positionally"
            )
        return [a for a in args if is_tensor(a)]
    if not spec.known():
        return _torch_flatten(spec, args, kwargs)
    if spec.type != "builtins.tuple" or len(spec.children) != 2:
        raise ValueError("the model's input spec is not (args, kwargs)")
    args_spec, kwargs_spec = spec.children
    out: list = []
    if len(args) != len(args_spec.children):
        raise TypeError(
            f"the model takes {len(args_spec.children)} positional argument(s), got {len(args)}"
        )
    for i, (a, child) in enumerate(zip(args, args_spec.children)):
        _flatten(a, child, f"argument {i}", out)
    if kwargs_spec.type not in _MAPPINGS:
        raise ValueError("the model's keyword-argument spec is not a dict")
    names = list(kwargs_spec.context)
    differ = _key_difference(names, kwargs)
    if differ:
        raise TypeError(f"the model takes keyword argument(s) {names}: {differ}")
    for name, child in zip(names, kwargs_spec.children):
        _flatten(kwargs[name], child, f"keyword argument {name!r}", out)
    return [x for x in out if is_tensor(x)]


def _build(spec: Spec, leaves: Any) -> Any:
    if spec.is_leaf:
        return next(leaves)
    children = [_build(c, leaves) for c in spec.children]
    if spec.type in _MAPPINGS:
        return _MAPPINGS[spec.type](zip(spec.context, children))
    return _SEQUENCES[spec.type](children)


def unflatten(spec: Spec | None, outputs: list) -> Any:
    """The flat outputs nested as the model returns them (a list when there is no spec)."""
    if spec is None:
        return outputs
    if spec.leaves != len(outputs):
        raise SpecMismatch(
            f"the model's output spec holds {spec.leaves} outputs, the model gave "
            f"{len(outputs)} (reloaded since its spec was read? call again)"
        )
    if not spec.known():
        return _torch_unflatten(spec, outputs)
    return _build(spec, iter(outputs))


def _torch_pytree(spec: Spec):
    try:
        from torch.utils import _pytree
    except ImportError:
        raise TypeError(
            f"the model's call structure uses pytree types this client reads only through "
            f"torch ({', '.join(sorted(_unknown(spec)))}): install torch"
        ) from None
    return _pytree


def _unknown(spec: Spec) -> set[str]:
    if spec.is_leaf:
        return set()
    own = set() if spec.type in _SEQUENCES or spec.type in _MAPPINGS else {str(spec.type)}
    return own.union(*(_unknown(c) for c in spec.children))


def _torch_flatten(spec: Spec, args: tuple, kwargs: dict) -> list:
    pytree = _torch_pytree(spec)
    from torch.export._tree_utils import reorder_kwargs

    flat = pytree.tree_flatten((args, reorder_kwargs(kwargs, pytree.treespec_loads(spec.source))))
    return [x for x in flat[0] if is_tensor(x)]


def _torch_unflatten(spec: Spec, outputs: list) -> Any:
    pytree = _torch_pytree(spec)
    return pytree.tree_unflatten(outputs, pytree.treespec_loads(spec.source))
