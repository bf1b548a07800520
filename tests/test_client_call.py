"""``model(*args, **kwargs)``: the client calls a served model as torch's loaded package does
(``AOTICompiledModel.__call__``): inputs flattened along the package's input spec, outputs
nested along its output spec; a call whose structure is not the model's is refused by name."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
from typing import NamedTuple

import model_zoo
import numpy as np
import pytest
import torch
from server_harness import running_server
from torch.utils import _pytree as torch_pytree

from aotiserve.client import AsyncClient, Client, InvalidArgumentError, pytree


@pytest.fixture(scope="module")
def srv():
    with running_server(("plain_structured", "plain_mlp")) as s:
        yield s


def _structured_call(seed: int = 0):
    torch.manual_seed(seed)
    return (torch.randn(4, 8), (torch.randn(3), torch.randn(5))), {"scale": torch.tensor(1.5)}


def _eager(args, kwargs):
    with torch.no_grad():
        return model_zoo.MODELS["plain_structured"].module()(*args, **kwargs)


def test_a_call_nests_inputs_and_outputs_as_the_exported_model(srv):
    args, kwargs = _structured_call()
    with Client(srv.target) as client:
        out = client.model("plain_structured")(*args, **kwargs)
    want = _eager(args, kwargs)
    assert isinstance(out, dict) and list(out) == ["h", "total", "pos"]
    for key in want:
        torch.testing.assert_close(out[key], want[key])
    assert out["total"].shape == () and out["pos"].dtype == torch.bool


def test_numpy_inputs_and_a_list_for_a_tuple_are_accepted(srv):
    args, kwargs = _structured_call(1)
    x, (a, b) = args
    with Client(srv.target) as client:
        out = client.model("plain_structured")(
            x.numpy(), [a.numpy(), b.numpy()], scale=np.float32(1.5), output_format="numpy"
        )
    want = _eager(args, kwargs)
    np.testing.assert_allclose(out["h"], want["h"].numpy(), rtol=1e-5, atol=1e-6)


def test_a_single_output_model_returns_the_tensor_itself(srv):
    x = torch.randn(3, 64)
    with Client(srv.target) as client:
        model = client.model("plain_mlp")
        out = model(x)
        assert isinstance(out, torch.Tensor)
        assert torch.equal(out, model.run([x])[0])


def _spec_reads(srv) -> float:
    return (
        srv.app.metrics.sample(
            "aotiserve_requests_total", model="plain_structured", method="GetCallSpec", code="OK"
        )
        or 0.0
    )


def test_the_call_spec_is_read_once_per_client_and_again_after_a_refused_call(srv):
    args, kwargs = _structured_call()
    with Client(srv.target) as client:
        before = _spec_reads(srv)
        for _ in range(3):  # a new handle each time, as `client.model(name)(...)` makes
            client.model("plain_structured")(*args, **kwargs)
        assert _spec_reads(srv) - before == 1
        with pytest.raises(InvalidArgumentError):  # a wrong shape: the server refuses it
            client.model("plain_structured")(torch.zeros(3, 8), *args[1:], **kwargs)
        client.model("plain_structured")(*args, **kwargs)
        assert _spec_reads(srv) - before == 2


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, p: ((x, p), {}), "keyword argument(s) ['scale']: missing ['scale']"),
        (
            lambda x, p: ((x, p), {"scale": torch.tensor(1.0), "bias": 1}),
            "unexpected ['bias']",
        ),
        (lambda x, p: ((x, p[:1]), {"scale": torch.tensor(1.0)}), "argument 1: expected 2 items"),
        (lambda x, p: ((x, p[0]), {"scale": torch.tensor(1.0)}), "argument 1: expected a sequence"),
        (
            lambda x, p: ((x,), {"scale": torch.tensor(1.0)}),
            "takes 2 positional argument(s), got 1",
        ),
    ],
)
def test_a_call_of_another_structure_is_refused_by_name(srv, call, message):
    (x, pair), _ = _structured_call()
    args, kwargs = call(x, pair)
    with Client(srv.target) as client:
        with pytest.raises(TypeError) as err:
            client.model("plain_structured")(*args, **kwargs)
    assert message in str(err.value)


def test_the_async_client_calls_the_same_way(srv):
    args, kwargs = _structured_call(2)

    async def go():
        async with AsyncClient(srv.target) as client:
            return await client.model("plain_structured")(*args, **kwargs)

    out = asyncio.run(go())
    want = _eager(args, kwargs)
    torch.testing.assert_close(out["h"], want["h"])


# ---- the spec reader against torch's own pytree (pure units)


class Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


torch_pytree._register_namedtuple(Pair, serialized_type_name="test_client_call.Pair")


def _roundtrip(tree):
    """Flattens ``tree`` with torch, reads torch's serialized spec, nests the leaves back."""
    leaves, spec = torch_pytree.tree_flatten(tree)
    ours = pytree.loads(torch_pytree.treespec_dumps(spec))
    assert ours.leaves == len(leaves)
    return pytree.unflatten(ours, leaves), leaves


def test_containers_nest_back_as_torch_nests_them():
    t = [torch.full((1,), float(i)) for i in range(8)]
    tree = {
        "tuple": (t[0], [t[1], t[2]]),
        "ordered": collections.OrderedDict([("z", t[3]), ("a", t[4])]),
        "default": collections.defaultdict(list, {"k": t[5]}),
        "deque": collections.deque([t[6]]),
        "named": Pair(t[7], t[0]),
    }
    got, _ = _roundtrip(tree)
    assert list(got) == list(tree)
    assert isinstance(got["tuple"], tuple) and isinstance(got["tuple"][1], list)
    assert isinstance(got["ordered"], collections.OrderedDict) and list(got["ordered"]) == [
        "z",
        "a",
    ]
    assert got["default"]["k"] is t[5]
    assert list(got["deque"]) == [t[6]]
    assert tuple(got["named"]) == (t[7], t[0])  # a named tuple comes back as a plain tuple


def test_leaves_that_are_not_tensors_are_dropped_from_the_inputs():
    spec = torch_pytree.tree_flatten(((torch.zeros(1), 3, None), {"k": "s"}))[1]
    ours = pytree.loads(torch_pytree.treespec_dumps(spec))
    x = np.zeros(1, np.float32)
    assert pytree.flatten_call(ours, (x, 3, None), {"k": "s"}) == [x]


def test_a_container_where_the_model_takes_a_tensor_is_a_type_error():
    """Dropped as "not a tensor", it would send the call one input short."""
    spec = torch_pytree.tree_flatten(((torch.zeros(1), (torch.zeros(1), torch.zeros(1))), {}))[1]
    ours = pytree.loads(torch_pytree.treespec_dumps(spec))
    x = np.zeros(1, np.float32)
    for args, where in [(((x,), (x, x)), "argument 0"), ((x, ([1.0], x)), r"argument 1\[0\]")]:
        with pytest.raises(TypeError, match=f"{where}: expected a tensor, got a"):
            pytree.flatten_call(ours, args, {})


def test_types_registered_with_torch_go_through_torch_pytree():
    @dataclasses.dataclass
    class Box:
        x: torch.Tensor
        y: torch.Tensor

    torch_pytree.register_dataclass(Box, serialized_type_name="test_client_call.Box")
    try:
        spec = torch_pytree.tree_flatten(Box(torch.zeros(1), torch.ones(1)))[1]
        ours = pytree.loads(torch_pytree.treespec_dumps(spec))
        assert not ours.known()
        got = pytree.unflatten(ours, [torch.ones(1), torch.zeros(1)])
        assert isinstance(got, Box) and torch.equal(got.x, torch.ones(1))
    finally:
        torch_pytree._deregister_pytree_node(Box)


def test_a_package_without_a_call_spec_takes_positional_tensors_only():
    x = np.zeros(1, np.float32)
    assert pytree.flatten_call(None, (x,), {}) == [x]
    assert pytree.unflatten(None, [x]) == [x]
    with pytest.raises(TypeError, match="no call spec"):
        pytree.flatten_call(None, (x,), {"k": x})


def test_a_spec_that_disagrees_with_the_outputs_is_a_named_mismatch():
    spec = pytree.loads(json.dumps([1, {"type": None, "context": None, "children_spec": []}]))
    with pytest.raises(pytree.SpecMismatch, match="holds 1 outputs, the model gave 2"):
        pytree.unflatten(spec, [1, 2])
