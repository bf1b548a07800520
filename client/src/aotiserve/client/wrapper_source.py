"""What the generated C++ wrapper of an AOTInductor model says about it (no torch needed).

Every ``.pt2`` that ``torch._inductor.aoti_compile_and_package`` makes holds the
model's generated wrapper source (``data/aotinductor/<model>/<hash>.wrapper.cpp``).
It is the only place a plain package records its interface, in code torch
generates from a fixed template (``torch/_inductor/codegen/cpp_wrapper_cpu.py``):

- the constructor: ``AOTInductorModelBase(num_inputs, num_outputs, num_constants, …)``,
  ``inputs_info_[i].name``, ``outputs_info_[i].name``, ``in_spec_``/``out_spec_`` and per
  constant ``constants_info_[i].{name,dtype,shape,original_fqn,from_folded,type,…}``;
- one ``check_input_<i>`` function per input: its dtype
  (``aoti_torch_dtype_<dtype>()``), each static dim (``if (64 != x_size[1])``), each
  dynamic dim's guards (``if (x_size[0] < 2)`` only with ``check_lowerbound``, the
  default; ``if (x_size[0] > 1024)`` where the dim has an upper bound), literal
  strides and the device type;
- ``run_impl``, whose last lines hand the outputs over (``output_handles[0] =
  buf5.release();``): an output's dtype and shape are read from the allocation of
  that buffer where it is a plain ``aoti_torch_empty_strided`` (else left unknown).

The parse is by regular expressions over that template; anything it does not
recognise stays ``None`` rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# torch's DEVICE_TO_INT (torch/_inductor/codegen/cpp_utils.py)
DEVICE_TYPES = {0: "cpu", 1: "cuda", 2: "mps", 12: "xpu"}
# What torch prints in const_run_impl of a package compiled without runtime constant
# folding: every weight the compiler could fold is baked into the kernels.
_NO_RUNTIME_FOLDING = "aot_inductor.use_runtime_constant_folding=False"

_BASE = re.compile(r"AOTInductorModelBase\(\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,")
_IO_NAME = re.compile(r"\b(inputs|outputs)_info_\[(\d+)\]\.name\s*=\s*\"([^\"]*)\"\s*;")
_CONST_FIELD = re.compile(r"\bconstants_info_\[(\d+)\]\.(\w+)\s*=\s*(.*?);\s*$", re.M)
_SPEC = re.compile(r"\b(in|out)_spec_\s*=\s*R\"\((.*?)\)\"\s*;", re.S)
_CHECK_FN = re.compile(r"static void check_input_(\d+)\(")
_HANDLE = re.compile(r"ConstantHandle (\w+) = ConstantHandle\(input_handles\[(\d+)\]\)")
_EXPECTED_DTYPE = re.compile(r"(\w+)_expected_dtype = aoti_torch_dtype_(\w+)\(\)")
_STATIC_DIM = re.compile(r"if \((-?\d+) != (\w+)_size\[(\d+)\]\)")
_LOWER = re.compile(r"if \((\w+)_size\[(\d+)\] < (-?\d+)\)")
_UPPER = re.compile(r"if \((\w+)_size\[(\d+)\] > (-?\d+)\)")
_STRIDE = re.compile(r"if \((-?\d+) != (\w+)_stride\[(\d+)\]\)")
_DEVICE = re.compile(r"(\w+)_expected_device_type = (\d+);")
_RUN_IMPL = re.compile(r"::run_impl\(")
_INPUT_MOVE = re.compile(r"auto (\w+) = std::move\(inputs\[(\d+)\]\);")
_DIM_USE = re.compile(r"\b(\w+)_(?:size|stride)\[(\d+)\]")
_OUTPUT = re.compile(r"output_handles\[(\d+)\]\s*=\s*(\w+)\.release\(\);")
_REUSE = re.compile(r"auto (\w+) = std::move\((\w+)\);")
_EMPTY = re.compile(
    r"aoti_torch_empty_strided\((\d+), (\w+), (\w+), cached_torch_dtype_(\w+), "
    r"cached_torch_device_type_(\w+), [^;]*?&(\w+)_handle\)"
)
# Dynamic sizes the wrapper names: "int64_t s23 = arg3_1_size[0];", "int64_t s77 = s23;",
# and the sizes it asserts of an input before using it: "assert_size_stride(arg4_1, {s23, }".
_SYM_FROM_SIZE = re.compile(r"int64_t (s\d+) = (\w+)_size\[(\d+)\];")
_SYM_ALIAS = re.compile(r"int64_t (s\d+) = (s\d+);")
_SIZES_ASSERTED = re.compile(r"assert_size_stride\((\w+), \{([^}]*)\}")
_SIZE_VAR = re.compile(r"auto (\w+)_size = (\w+)\.sizes\(\);")
_INT_ARRAY = re.compile(r"int64_t (int_array_\d+)\[\] = \{([^}]*)\};")
_LITERAL = re.compile(r"^-?\d+L?$")


@dataclass(frozen=True)
class WrapperTensor:
    """An input or output as the wrapper describes it.

    ``shape`` uses -1 for a dynamic dim; ``min_shape``/``max_shape`` are the sizes
    the wrapper's guards accept per dim (static dims: the size itself; a dynamic dim
    with no lower guard: 0; with no upper guard: -1, meaning unbounded). Any of them
    is None where the source does not say.
    """

    graph_name: str
    dtype: str | None = None  # torch's name: "float32", "int64"...
    shape: tuple[int, ...] | None = None
    min_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None
    strides: tuple[int | None, ...] | None = None  # literal strides the guards check
    device_type: str | None = None


@dataclass(frozen=True)
class WrapperConstant:
    """One entry of ``constants_info_``."""

    name: str
    fqn: str
    dtype: str | None
    shape: tuple[int, ...]
    kind: str  # torch's ConstantType: Parameter, Buffer, TensorConstant, FoldedConstant
    from_folded: bool  # computed by runtime constant folding from other constants
    data_size: int | None = None


@dataclass(frozen=True)
class WrapperInfo:
    num_inputs: int | None
    num_outputs: int | None
    num_constants: int | None
    inputs: tuple[WrapperTensor, ...]
    outputs: tuple[WrapperTensor, ...]
    constants: tuple[WrapperConstant, ...]
    in_spec: str | None
    out_spec: str | None
    # False: compiled without runtime constant folding (torch's default), so weights the
    # compiler could fold were baked into the kernels and are no constants at all.
    runtime_constant_folding: bool
    # Whether any dynamic dim has a lower-bound guard (torch's check_lowerbound, default on).
    lowerbound_checks: bool
    # Input dims that must have the same size, as groups of (input index, dim): the model
    # uses one size for all of them. torch's own guard on them skips zero-element inputs
    # (an input of size 0 there reaches the kernels and can crash the process), so the
    # daemon checks them itself before a run.
    ties: tuple[tuple[tuple[int, int], ...], ...] = ()
    # Names of the functions the wrapper defines that mark torch features (e.g.
    # AOTInductorGetLastError, new in torch 2.13), for a version hint.
    features: frozenset[str] = field(default_factory=frozenset)


def _ints(text: str) -> tuple[int, ...] | None:
    text = text.strip().strip("{}").strip()
    if not text:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not _LITERAL.match(part):
            return None
        out.append(int(part.rstrip("L")))
    return tuple(out)


def _dims(text: str) -> tuple[int, ...]:
    """``{s77, 3L}`` → (-1, 3): a symbol or expression is a dynamic dim."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            out.append(int(part.rstrip("L")) if _LITERAL.match(part) else -1)
    return tuple(out)


def _constants(source: str) -> tuple[WrapperConstant, ...]:
    fields: dict[int, dict[str, str]] = {}
    for m in _CONST_FIELD.finditer(source):
        fields.setdefault(int(m.group(1)), {})[m.group(2)] = m.group(3).strip()
    out = []
    for i in sorted(fields):
        f = fields[i]
        name = f.get("name", "").strip('"')
        dtype = re.search(r"cached_torch_dtype_(\w+)", f.get("dtype", ""))
        kind = re.search(r"ConstantType::(\w+)", f.get("type", ""))
        size = f.get("data_size", "")
        out.append(
            WrapperConstant(
                name=name,
                fqn=f.get("original_fqn", "").strip('"') or name,
                dtype=dtype.group(1) if dtype else None,
                shape=_ints(f.get("shape", "{}")) or (),
                kind=kind.group(1) if kind else "Unknown",
                from_folded=f.get("from_folded", "false") == "true",
                data_size=int(size) if size.isdigit() else None,
            )
        )
    return tuple(out)


def _check_bodies(source: str) -> dict[int, str]:
    """check_input_<i> → its body (up to the next check function or the env check)."""
    starts = [(int(m.group(1)), m.start()) for m in _CHECK_FN.finditer(source)]
    end_all = source.find("_check_aoti_runtime_check_inputs_env()", starts[-1][1]) if starts else -1
    bodies = {}
    for k, (idx, start) in enumerate(starts):
        end = starts[k + 1][1] if k + 1 < len(starts) else (end_all if end_all > 0 else len(source))
        bodies[idx] = source[start:end]
    return bodies


def _run_impl(source: str) -> str:
    m = None
    for m in _RUN_IMPL.finditer(source):  # noqa: B007 (the definition is the last mention)
        pass
    if m is None:
        return ""
    end = source.find("} // AOTInductorModel::run_impl", m.end())
    return source[m.end() : end if end > 0 else len(source)]


def _input(idx: int, name: str, body: str, run_impl: str) -> WrapperTensor:
    handle = _HANDLE.search(body)
    var = handle.group(1) if handle else name
    dtype = next((m.group(2) for m in _EXPECTED_DTYPE.finditer(body) if m.group(1) == var), None)
    static = {
        int(m.group(3)): int(m.group(1)) for m in _STATIC_DIM.finditer(body) if m.group(2) == var
    }
    lower = {int(m.group(2)): int(m.group(3)) for m in _LOWER.finditer(body) if m.group(1) == var}
    upper = {int(m.group(2)): int(m.group(3)) for m in _UPPER.finditer(body) if m.group(1) == var}
    strides = {
        int(m.group(3)): int(m.group(1)) for m in _STRIDE.finditer(body) if m.group(2) == var
    }
    # The rank: every dim index the guards or run_impl touch (a dynamic dim with no guard
    # at all still has a stride check or a size read unless it is the only thing unsaid).
    touched = set(static) | set(lower) | set(upper) | set(strides)
    local = {m.group(1) for m in _INPUT_MOVE.finditer(run_impl) if int(m.group(2)) == idx}
    touched |= {int(m.group(2)) for m in _DIM_USE.finditer(run_impl) if m.group(1) in local | {var}}
    rank = max(touched) + 1 if touched else 0
    shape = tuple(static.get(d, -1) for d in range(rank))
    min_shape = tuple(static[d] if d in static else lower.get(d, 0) for d in range(rank))
    max_shape = tuple(static[d] if d in static else upper.get(d, -1) for d in range(rank))
    device = next((int(m.group(2)) for m in _DEVICE.finditer(body) if m.group(1) == var), None)
    return WrapperTensor(
        graph_name=name,
        dtype=dtype,
        shape=shape,
        min_shape=min_shape,
        max_shape=max_shape,
        strides=tuple(strides.get(d) for d in range(rank)),
        device_type=DEVICE_TYPES.get(device) if device is not None else None,
    )


def _outputs(
    names: list[str], run_impl: str, inputs: dict[str, WrapperTensor]
) -> tuple[WrapperTensor, ...]:
    arrays = {m.group(1): m.group(2) for m in _INT_ARRAY.finditer(run_impl)}
    allocs = {m.group(6): m for m in _EMPTY.finditer(run_impl)}
    reused = {m.group(1): m.group(2) for m in _REUSE.finditer(run_impl)}
    moved = {m.group(1): int(m.group(2)) for m in _INPUT_MOVE.finditer(run_impl)}
    handed = {int(m.group(1)): m.group(2) for m in _OUTPUT.finditer(run_impl)}
    by_index = list(inputs.values())
    out = []
    for i, name in enumerate(names):
        var = handed.get(i)
        seen = set()
        while var in reused and var not in seen:  # auto buf5 = std::move(buf4);  // reuse
            seen.add(var)
            var = reused[var]
        alloc = allocs.get(var) if var else None
        if alloc is not None and alloc.group(2) in arrays:
            shape = _dims(arrays[alloc.group(2)])
            if len(shape) == int(alloc.group(1)):
                out.append(WrapperTensor(name, alloc.group(4), shape, device_type=alloc.group(5)))
                continue
        if var in moved and moved[var] < len(by_index):  # an input handed back
            src = by_index[moved[var]]
            out.append(WrapperTensor(name, src.dtype, src.shape, device_type=src.device_type))
            continue
        out.append(WrapperTensor(name))
    return tuple(out)


def _ties(run_impl: str) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Input dims the wrapper gives one size symbol (see :attr:`WrapperInfo.ties`)."""
    inputs = {m.group(1): int(m.group(2)) for m in _INPUT_MOVE.finditer(run_impl)}
    sized = {m.group(1): m.group(2) for m in _SIZE_VAR.finditer(run_impl)}  # arg3_1 -> arg3_1
    root: dict[str, str] = {}

    def find(sym: str) -> str:
        while root.get(sym, sym) != sym:
            sym = root[sym]
        return sym

    members: dict[str, set[tuple[int, int]]] = {}

    def tie(sym: str, var: str, dim: int) -> None:
        if var in inputs:
            members.setdefault(sym, set()).add((inputs[var], dim))

    for m in _SYM_FROM_SIZE.finditer(run_impl):
        tie(m.group(1), sized.get(m.group(2), m.group(2)), int(m.group(3)))
    for m in _SYM_ALIAS.finditer(run_impl):
        a, b = find(m.group(1)), find(m.group(2))
        if a != b:
            root[a] = b
    for m in _SIZES_ASSERTED.finditer(run_impl):
        for dim, expr in enumerate(e.strip() for e in m.group(2).split(",")):
            if re.fullmatch(r"s\d+", expr):
                tie(expr, m.group(1), dim)
    groups: dict[str, set[tuple[int, int]]] = {}
    for sym, dims in members.items():
        groups.setdefault(find(sym), set()).update(dims)
    return tuple(tuple(sorted(dims)) for _sym, dims in sorted(groups.items()) if len(dims) > 1)


def parse(source: str) -> WrapperInfo:
    """Parses one model's generated wrapper source."""
    base = _BASE.search(source)
    names: dict[str, dict[int, str]] = {"inputs": {}, "outputs": {}}
    for m in _IO_NAME.finditer(source):
        names[m.group(1)][int(m.group(2))] = m.group(3)
    num_in = int(base.group(1)) if base else (max(names["inputs"], default=-1) + 1)
    num_out = int(base.group(2)) if base else (max(names["outputs"], default=-1) + 1)
    in_names = [names["inputs"].get(i, f"input{i}") for i in range(num_in)]
    out_names = [names["outputs"].get(i, f"output{i}") for i in range(num_out)]
    bodies = _check_bodies(source)
    run_impl = _run_impl(source)
    inputs = []
    for i, name in enumerate(in_names):
        body = bodies.get(i)
        inputs.append(_input(i, name, body, run_impl) if body is not None else WrapperTensor(name))
    specs = {m.group(1): m.group(2) for m in _SPEC.finditer(source)}
    features = frozenset(f for f in ("AOTInductorGetLastError",) if f in source)
    return WrapperInfo(
        num_inputs=num_in if base else None,
        num_outputs=num_out if base else None,
        num_constants=int(base.group(3)) if base else None,
        inputs=tuple(inputs),
        outputs=_outputs(out_names, run_impl, {t.graph_name: t for t in inputs}),
        constants=_constants(source),
        in_spec=specs.get("in"),
        out_spec=specs.get("out"),
        runtime_constant_folding=_NO_RUNTIME_FOLDING not in source,
        lowerbound_checks=any(_LOWER.search(b) for b in bodies.values()),
        ties=_ties(run_impl),
        features=features,
    )
