"""Reading a model repository: which packages it holds and how each model is placed.

A repository is a folder of ``<name>.pt2`` packages, each with an optional
``<name>.toml`` or ``<name>.json`` (placement, batching, warm-up) and optional
per-device-type packages ``<name>.<device type>.pt2`` (e.g. ``mlp.cuda.pt2``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import tomllib

from .model_types import ModelOptions

DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def repository_models(folder: Path) -> dict[str, tuple[Path, dict[str, str]]]:
    """name -> (package, {device type: variant package}) for a model repository.

    ``<name>.pt2`` is the model; ``<name>.<device type>.pt2`` (e.g. ``mlp.cuda.pt2``) is
    its package for that device type, used when the model is placed there.
    """
    found: dict[str, tuple[Path | None, dict[str, str]]] = {}
    for pt2 in sorted(folder.glob("*.pt2")):
        base, _, kind = pt2.stem.rpartition(".")
        if base and kind in DEVICE_TYPES:
            found.setdefault(base, (None, {}))[1][kind] = str(pt2)
        else:
            found.setdefault(pt2.stem, (None, {}))
            found[pt2.stem] = (pt2, found[pt2.stem][1])
    out = {}
    for name, (main, variants) in found.items():
        if main is None:  # only variants: the first one names the model's package
            main = Path(next(iter(variants.values())))
        out[name] = (main, variants)
    return out


def read_model_options(
    pt2: Path,
    defaults: ModelOptions,
    name: str | None = None,
    variants: Mapping[str, str] | None = None,
) -> ModelOptions:
    """The placement of repository model ``name`` (default: the package's stem): its
    ``<name>.toml``/``.json`` over ``defaults``, plus its per-device-type packages."""
    name = name or pt2.stem
    if variants is None:
        variants = repository_models(pt2.parent).get(name, (pt2, {}))[1]
    for suffix, parse in ((".toml", tomllib.loads), (".json", json.loads)):
        cfg = pt2.parent / f"{name}{suffix}"
        if cfg.exists():
            data = parse(cfg.read_text())
            devices = data.get("devices", defaults.devices)
            if isinstance(devices, str):
                devices = [d.strip() for d in devices.split(",") if d.strip()]
            paths = dict(variants)
            for key, value in (data.get("packages") or {}).items():
                paths[key] = str(pt2.parent / value)
            return ModelOptions(
                devices=tuple(devices),
                runners=int(data.get("runners", data.get("runners_per_model", defaults.runners))),
                package_model=data.get("package_model") or None,
                device_paths=paths,
                batch_max_size=int(data.get("batch_max_size", defaults.batch_max_size)),
                batch_max_delay_us=int(data.get("batch_max_delay_us", defaults.batch_max_delay_us)),
                reserve_inactive=bool(
                    data.get("reserve_inactive_buffer", defaults.reserve_inactive)
                ),
                warmup_runs=int(data.get("warmup_runs", defaults.warmup_runs)),
            )
    return replace(defaults, device_paths=dict(variants))
