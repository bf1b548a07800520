"""Tiny models for tests and benchmarks, compiled once and cached on disk.

The cache key is the torch version plus a hash of the model's source and
build arguments, so a second test run compiles nothing and a change to a
model recompiles only that model.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim
from torch.utils import _pytree as pytree

from aotiserve.server.packaging import pack

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache" / "models"


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 32)
        self.fc2 = torch.nn.Linear(32, 10)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))) * self.scale


class TensorConst(torch.nn.Module):
    """A lifted tensor constant (a plain tensor attribute, not a buffer) beside weights the
    package folds at run time (``weight * scale + 1``)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)
        self.register_buffer("scale", torch.tensor(2.0))
        self.c = torch.tensor([1.0, 2.0, 3.0, 4.0])

    def forward(self, x):
        return x @ (self.fc.weight * self.scale + 1.0).t() + self.fc.bias + self.c


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean(dim=(2, 3)))


class TwoInOut(torch.nn.Module):
    """Two inputs of different dtypes, a tuple of two outputs."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 4)
        self.emb = torch.nn.Embedding(100, 4)

    def forward(self, x, ids):
        h = self.proj(x) + self.emb(ids)
        return h, (ids * 2 + 1)


class ComputeBound(torch.nn.Module):
    """4 x Linear(1024, 1024): enough work per call to show GIL effects."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])

    def forward(self, x):
        return self.layers(x)


class Passthrough(torch.nn.Module):
    """out = x * w + b with one scalar weight: large tensors in and out, trivial compute."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.b = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        return x * self.w + self.b


class BigEmbed(torch.nn.Module):
    """4 x Embedding(65536, 1024) float32 = 1 GiB of weights, a trivial run (a row gather):
    the weights bench and the 1 GiB upload test. Weights live outside the .so (a .so
    with 1 GiB of constants compiles slowly)."""

    def __init__(self):
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(65536, 1024) for _ in range(4))

    def forward(self, ids):
        return sum(t(ids) for t in self.tables)


class ManyEmbed(torch.nn.Module):
    """100 x Embedding(rows, 1024) float32: 1 GiB (rows=2622) of weights in 100 constants
    of 1% each, for partial updates (bench/weights.py --paths: updating 1% of the bytes)."""

    def __init__(self, rows: int = 2622):
        super().__init__()
        self.tables = torch.nn.ModuleList(torch.nn.Embedding(rows, 1024) for _ in range(100))

    def forward(self, ids):
        return sum(t(ids) for t in self.tables)


class Alias(torch.nn.Module):
    """Its first output is a view of its input (AOTInductor hands such views back as they
    are): the port must keep the request's bytes alive while it sends them."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x):
        return x.view(-1), x * self.w


class FailingCheck(torch.nn.Module):
    """A runtime check of the model's own that no input passes: every run fails inside
    the runner, not over the caller's input."""

    def forward(self, x):
        n = (x > 1e30).sum().item()
        torch._check(n > 0)
        return x + n


class Structured(torch.nn.Module):
    """Nested inputs, a keyword-only argument and a dict of outputs (a 0-dim and a bool one
    among them): the call structure ``Model.__call__`` follows."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x, pair, *, scale):
        h = self.lin(x) * scale + pair[0].sum() - pair[1].sum()
        return {"h": h, "total": h.sum(), "pos": h > 0}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[[], torch.nn.Module]
    example: Callable[[int], tuple[torch.Tensor, ...]]  # batch -> inputs
    dynamic_batch: bool = True
    max_batch: int = 1024
    weights_outside_so: bool = False
    pack_kwargs: dict[str, Any] = field(default_factory=dict)
    # Compiled with torch's own aoti_compile_and_package (no aotiserve pack): what most
    # users bring. ``inductor_configs`` are passed as they are (default options: {}).
    plain: bool = False
    inductor_configs: dict[str, Any] = field(default_factory=dict)
    # Keyword arguments of the example call (batch -> kwargs), for plain packages.
    example_kwargs: Callable[[int], dict[str, Any]] | None = None

    def module(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.factory().eval()

    def inputs(self, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(seed)
        return self.example(batch)

    def dynamic_shapes(self):
        if not self.dynamic_batch:
            return None
        batch = Dim("batch", min=1, max=self.max_batch)
        return tuple({0: batch} for _ in self.example(2))

    def cache_key(self) -> str:
        src = (
            inspect.getsource(self.factory)
            + inspect.getsource(self.example)
            + repr(
                (
                    self.dynamic_batch,
                    self.max_batch,
                    self.weights_outside_so,
                    sorted(self.pack_kwargs.items()),
                )
            )
        )
        if self.plain:
            src += repr(sorted(self.inductor_configs.items())) + inspect.getsource(_compile_plain)
            if self.example_kwargs is not None:
                src += inspect.getsource(self.example_kwargs)
        else:
            src += inspect.getsource(pack)
        return hashlib.sha256(src.encode()).hexdigest()[:16]


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("mlp", MLP, lambda b: (torch.randn(b, 64),)),
        ModelSpec("tensor_const", TensorConst, lambda b: (torch.randn(b, 8),)),
        ModelSpec("conv", ConvNet, lambda b: (torch.randn(b, 3, 16, 16),), max_batch=256),
        ModelSpec(
            "two_io",
            TwoInOut,
            lambda b: (torch.randn(b, 16), torch.randint(0, 100, (b,))),
            pack_kwargs={"input_names": ("x", "ids"), "output_names": ("h", "ids2")},
        ),
        ModelSpec("blob_mlp", MLP, lambda b: (torch.randn(b, 64),), weights_outside_so=True),
        ModelSpec("compute", ComputeBound, lambda b: (torch.randn(64, 1024),), dynamic_batch=False),
        # The same layers with a dynamic batch: where dynamic batching pays (bench/batching.py).
        ModelSpec("compute_dyn", ComputeBound, lambda b: (torch.randn(b, 1024),), max_batch=256),
        ModelSpec(
            "passthrough",
            Passthrough,
            lambda b: (torch.randn(b, 1024),),
            max_batch=1 << 16,
        ),
        ModelSpec("alias", Alias, lambda b: (torch.randn(b, 1024),), max_batch=4096),
        ModelSpec("failing", FailingCheck, lambda b: (torch.randn(b, 8),), dynamic_batch=False),
        ModelSpec(
            "big_embed",
            BigEmbed,
            lambda b: (torch.randint(0, 65536, (b,)),),
            weights_outside_so=True,
        ),
        ModelSpec(
            "many_embed",
            ManyEmbed,
            lambda b: (torch.randint(0, 2622, (b,)),),
            weights_outside_so=True,
        ),
        # The same at 4 GiB (GPU recipe: bench/weights.py --paths --gib 4).
        ModelSpec(
            "many_embed_4g",
            lambda: ManyEmbed(10488),
            lambda b: (torch.randint(0, 10488, (b,)),),
            weights_outside_so=True,
        ),
        # Plain packages (issue 18): torch's defaults, so a Dim(min=1) batch refuses 1
        # (check_lowerbound) and some weights are folded into code.
        ModelSpec("plain_mlp", MLP, lambda b: (torch.randn(b, 64),), plain=True),
        ModelSpec(
            "plain_mlp_nolb",
            MLP,
            lambda b: (torch.randn(b, 64),),
            plain=True,
            inductor_configs={"aot_inductor.check_lowerbound": False},
        ),
        ModelSpec(
            "plain_two_io",
            TwoInOut,
            lambda b: (torch.randn(b, 16), torch.randint(0, 100, (b,))),
            plain=True,
        ),
        ModelSpec(
            "plain_structured",
            Structured,
            lambda b: (torch.randn(b, 8), (torch.randn(3), torch.randn(5))),
            dynamic_batch=False,
            plain=True,
            example_kwargs=lambda b: {"scale": torch.tensor(2.0)},
        ),
        ModelSpec(
            "plain_static",
            ConvNet,
            lambda b: (torch.randn(2, 3, 8, 8),),
            dynamic_batch=False,
            plain=True,
        ),
    ]
}

# Multi-model packages: package name -> {model name in the package: zoo model}. Made with
# torch's package_aoti from the members' compiled files (nothing compiles twice).
MULTI: dict[str, dict[str, str]] = {
    "plain_multi": {"model": "plain_mlp", "static": "plain_static"},
}


def cache_dir() -> Path:
    root = Path(os.environ.get("AOTISERVE_MODEL_CACHE", DEFAULT_CACHE))
    return root / f"torch-{torch.__version__}"


def _compile_plain(spec: ModelSpec, device: str, path: Path) -> None:
    """torch's plain API, as a user who never heard of aotiserve would call it."""
    to_device = functools.partial(pytree.tree_map, lambda t: t.to(device))
    kwargs = spec.example_kwargs(4) if spec.example_kwargs else {}
    with torch.no_grad():
        ep = torch.export.export(
            spec.module().to(device),
            to_device(spec.inputs(4)),
            to_device(kwargs),
            dynamic_shapes=spec.dynamic_shapes(),
        )
        torch._inductor.aoti_compile_and_package(
            ep, package_path=str(path), inductor_configs=dict(spec.inductor_configs) or None
        )


def _package_multi(members: dict[str, str], device: str, path: Path, tmp: Path) -> None:
    """A multi-model package: each member's files (from its own package) under its name."""
    from torch._inductor.package import package_aoti

    files: dict[str, list[str]] = {}
    for model_name, zoo_name in members.items():
        folder = tmp / model_name
        folder.mkdir()
        with zipfile.ZipFile(compiled(zoo_name, device)) as zf:
            for member in zf.namelist():
                if "/data/aotinductor/model/" in member:
                    target = folder / Path(member).name
                    target.write_bytes(zf.read(member))
                    files.setdefault(model_name, []).append(str(target))
    package_aoti(str(path), files)


def _cache_path(name: str, device: str) -> Path:
    suffix = "" if device == "cpu" else f"-{device.replace(':', '')}"
    if name in MULTI:
        key = repr(sorted((k, MODELS[v].cache_key()) for k, v in MULTI[name].items()))
        key = hashlib.sha256((key + inspect.getsource(_package_multi)).encode()).hexdigest()[:16]
    else:
        key = MODELS[name].cache_key()
    return cache_dir() / f"{name}-{key}{suffix}.pt2"


def compiled(name: str, device: str = "cpu") -> Path:
    """Path of the compiled package for a zoo model, compiling it on a cache miss."""
    path = _cache_path(name, device)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temp name and rename, so a killed run leaves no half file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        if name in MULTI:
            _package_multi(MULTI[name], device, tmp_path, Path(tmp))
        elif MODELS[name].plain:
            _compile_plain(MODELS[name], device, tmp_path)
        else:
            spec = MODELS[name]
            pack(
                spec.module().to(device),
                tuple(t.to(device) for t in spec.inputs(4)),
                tmp_path,
                dynamic_shapes=spec.dynamic_shapes(),
                weights_outside_so=spec.weights_outside_so,
                **spec.pack_kwargs,
            )
        os.replace(tmp_path, path)
    return path


def eager(name: str, inputs) -> list[torch.Tensor]:
    """Eager reference outputs as a flat list."""
    with torch.no_grad():
        out = MODELS[name].module()(*inputs)
    return list(out) if isinstance(out, (tuple, list)) else [out]
