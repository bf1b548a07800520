"""Compiles a ``torch.nn.Module`` into an AOTInductor package aotiserve serves well.

Two things differ from a bare ``aoti_compile_and_package``:
- runtime constant folding is on by default, so every parameter and buffer
  stays an updatable constant (without it inductor folds some weights into
  code and a weight swap silently keeps them);
- input/output names, dtypes and shapes (-1 for dynamic dimensions) are
  recorded in the package's AOTI metadata under their own names, with the torch
  version that compiled it (a plain package is described from its generated
  wrapper source instead: aotiserve.client.pt2).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aotiserve.client.pt2 import INPUTS_KEY, OUTPUTS_KEY, TORCH_VERSION_KEY

log = logging.getLogger(__name__)


def _spec(name: str, value: Any) -> dict[str, Any]:
    shape = [
        int(d) if isinstance(d, int) or not isinstance(d, torch.SymInt) else -1 for d in value.shape
    ]
    return {"name": name, "dtype": str(value.dtype).removeprefix("torch."), "shape": shape}


def _io_specs(ep: torch.export.ExportedProgram, input_names, output_names):
    user_inputs = [
        node
        for node in ep.graph.nodes
        if node.op == "placeholder" and node.name in set(ep.graph_signature.user_inputs)
    ]
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    user_outputs = [a for a in output_node.args[0]][: len(ep.graph_signature.user_outputs)]
    in_names = list(input_names) if input_names else [n.name for n in user_inputs]
    out_names = (
        list(output_names) if output_names else [f"output__{i}" for i in range(len(user_outputs))]
    )
    if len(in_names) != len(user_inputs) or len(out_names) != len(user_outputs):
        raise ValueError(
            f"the model has {len(user_inputs)} inputs and {len(user_outputs)} outputs; "
            f"got {len(in_names)} input names and {len(out_names)} output names"
        )
    inputs = [_spec(name, node.meta["val"]) for name, node in zip(in_names, user_inputs)]
    outputs = [_spec(name, node.meta["val"]) for name, node in zip(out_names, user_outputs)]
    return inputs, outputs


def pack(
    module: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor],
    package_path: str | os.PathLike,
    *,
    dynamic_shapes: Any = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    runtime_constant_folding: bool = True,
    weights_outside_so: bool = False,
    inductor_configs: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Exports and compiles ``module`` to ``package_path`` (a ``.pt2``).

    ``weights_outside_so`` stores the weights as a binary blob beside the
    library inside the package (``update_constant_buffer_from_blob`` format).
    """
    was_training = module.training
    try:  # exported in eval mode; the caller's module is left as it was (a trainer goes on)
        module.eval()
        with torch.no_grad():
            ep = torch.export.export(module, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    finally:
        module.train(was_training)
    inputs, outputs = _io_specs(ep, input_names, output_names)
    configs: dict[str, Any] = {
        "aot_inductor.use_runtime_constant_folding": runtime_constant_folding,
        # The runtime input guards (which aotiserve.runner_ext turns on) would
        # otherwise refuse a dynamic dimension of size 1, e.g. batch 1.
        "aot_inductor.check_lowerbound": False,
    }
    if weights_outside_so:
        configs["aot_inductor.package_constants_in_so"] = False
        configs["aot_inductor.package_constants_on_disk_format"] = "binary_blob"
    configs.update(inductor_configs or {})
    # Older torch releases lack some options; drop what this torch does not know.
    known = torch._inductor.config.aot_inductor
    configs = {
        k: v
        for k, v in configs.items()
        if not k.startswith("aot_inductor.") or hasattr(known, k.split(".", 1)[1])
    }
    user_metadata = dict(configs.pop("aot_inductor.metadata", {}) or {})
    user_metadata.update(metadata or {})
    user_metadata[INPUTS_KEY] = json.dumps(inputs)
    user_metadata[OUTPUTS_KEY] = json.dumps(outputs)
    # A package torch made alone does not say which torch made it (aotiserve inspect shows it).
    user_metadata[TORCH_VERSION_KEY] = torch.__version__
    configs["aot_inductor.metadata"] = user_metadata
    package_path = Path(package_path)
    package_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling %s into %s", type(module).__name__, package_path)
    out = torch._inductor.aoti_compile_and_package(
        ep, package_path=str(package_path), inductor_configs=configs
    )
    return Path(out)


def read_io_specs(metadata: dict[str, str]) -> tuple[list[dict], list[dict]] | None:
    """The (inputs, outputs) specs that :func:`pack` recorded, or None."""
    if INPUTS_KEY not in metadata or OUTPUTS_KEY not in metadata:
        return None
    return json.loads(metadata[INPUTS_KEY]), json.loads(metadata[OUTPUTS_KEY])
