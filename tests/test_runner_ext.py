"""The extension against eager PyTorch: results, constant buffers, bad input."""

from __future__ import annotations

import threading
import zipfile

import pytest
import torch

from aotiserve import runner_ext as rx

TEST_MODELS = ("mlp", "conv", "two_io", "blob_mlp")
# Models compiled by torch < 2.13 have no AOTInductorGetLastError: the error
# then names the failed call only (the model's own message goes to stderr).
OLD_TORCH_FAILURE = "API call failed at"


@pytest.fixture(scope="module")
def loaded(model_package):
    cache = {}

    def get(name: str, **kwargs) -> rx.LoadedModel:
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = rx.load_model(model_package(name), **kwargs)
        return cache[key]

    yield get
    for model in cache.values():
        model.close()


def _fresh(model_package, name="mlp") -> rx.LoadedModel:
    return rx.load_model(model_package(name))


def _allclose(outputs, expected):
    assert len(outputs) == len(expected)
    for out, ref in zip(outputs, expected):
        assert out.dtype == ref.dtype and out.shape == ref.shape
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TEST_MODELS)
@pytest.mark.parametrize("batch", [1, 5])
def test_run_matches_eager(loaded, zoo, name, batch):
    inputs = zoo.MODELS[name].inputs(batch, seed=batch)
    _allclose(loaded(name).runner.run(list(inputs)), zoo.eager(name, inputs))


def test_run_holding_gil_matches_run_and_refuses_the_same_input(loaded, zoo):
    """The GIL-holding variant (used for microsecond runs) computes and checks alike."""
    runner = loaded("mlp").runner
    inputs = zoo.MODELS["mlp"].inputs(3)
    _allclose(runner.run_holding_gil(list(inputs)), runner.run(list(inputs)))
    bad = [torch.zeros(3, 7)]
    with pytest.raises((ValueError, RuntimeError)) as released:
        runner.run(bad)
    with pytest.raises((ValueError, RuntimeError)) as held:
        runner.run_holding_gil(bad)
    assert type(held.value) is type(released.value) and str(held.value) == str(released.value)


def test_short_runs_follow_the_measured_compute_time():
    from aotiserve.server.served_model import SHORT_RUN_S, Replica

    replica = Replica(loaded=None, pool=None, slot=None)
    for _ in range(50):
        replica.note_compute(SHORT_RUN_S / 4)
    assert replica.short_runs
    replica.note_compute(100 * SHORT_RUN_S)  # one long run is enough to release the GIL again
    assert not replica.short_runs


def test_compiled_backends_and_missing_backends():
    assert "cpu" in rx.compiled_backends()
    for backend, cls in [
        ("cuda", rx.AOTIModelContainerRunnerCuda),
        ("xpu", rx.AOTIModelContainerRunnerXpu),
        ("mps", rx.AOTIModelContainerRunnerMps),
    ]:
        if backend not in rx.compiled_backends():
            with pytest.raises(RuntimeError, match=f"not compiled with {backend.upper()} support"):
                cls("model.so", 1)


def test_runner_classes_mirror_torch_binding():
    names = [
        "run",
        "get_call_spec",
        "get_constant_names_to_original_fqns",
        "get_constant_names_to_dtypes",
        "extract_constants_map",
        "update_constant_buffer",
        "swap_constant_buffer",
        "free_inactive_constant_buffer",
        "update_constant_buffer_from_blob",
    ]
    for name in names:
        assert hasattr(rx.AOTIModelContainerRunnerCpu, name), name
        assert hasattr(torch._C._aoti.AOTIModelContainerRunnerCpu, name), name
    for helper in [
        "unsafe_alloc_void_ptrs_from_tensors",
        "unsafe_alloc_void_ptr_from_tensor",
        "alloc_tensors_by_stealing_from_void_ptrs",
        "alloc_tensor_by_stealing_from_void_ptr",
    ]:
        assert callable(getattr(rx, helper))


def test_bare_so_with_torch_constructor_arguments(loaded, zoo, model_package, tmp_path):
    with zipfile.ZipFile(model_package("mlp")) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".wrapper.so"))
        so = tmp_path / "model.so"
        so.write_bytes(zf.read(member))
    runner = rx.AOTIModelContainerRunnerCpu(str(so), 2)
    inputs = zoo.MODELS["mlp"].inputs(3)
    _allclose(runner.run(list(inputs)), zoo.eager("mlp", inputs))
    in_spec, out_spec = runner.get_call_spec()
    assert in_spec and out_spec


def test_metadata_and_io_names(loaded):
    model = loaded("two_io")
    assert model.metadata["AOTI_DEVICE_KEY"] == "cpu"
    assert model.runner.get_num_inputs() == 2
    assert model.runner.get_num_outputs() == 2
    assert len(model.runner.get_input_names()) == 2


def test_handle_helpers_round_trip():
    tensors = [torch.arange(4.0), torch.ones(2, dtype=torch.int64)]
    handles = rx.unsafe_alloc_void_ptrs_from_tensors(tensors)
    back = rx.alloc_tensors_by_stealing_from_void_ptrs(handles)
    assert all(torch.equal(a, b) for a, b in zip(tensors, back))
    one = rx.alloc_tensor_by_stealing_from_void_ptr(
        rx.unsafe_alloc_void_ptr_from_tensor(torch.arange(3))
    )
    assert torch.equal(one, torch.arange(3))


def test_multi_model_package(zoo, model_package, tmp_path):
    import torch._inductor.package as pkg  # noqa: F401  (only for naming checks)

    src = model_package("mlp")
    dst = tmp_path / "multi.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info.filename, data)
            if "/aotinductor/model/" in info.filename:
                zout.writestr(
                    info.filename.replace("/aotinductor/model/", "/aotinductor/second/"), data
                )
    assert rx.list_package_models(dst) == ["model", "second"]
    model = rx.load_model(dst, model_name="second")
    inputs = zoo.MODELS["mlp"].inputs(2)
    _allclose(model.runner.run(list(inputs)), zoo.eager("mlp", inputs))
    with pytest.raises(rx.PackageError, match="no model named 'third'"):
        rx.load_model(dst, model_name="third")


# --- constant buffers -------------------------------------------------------


def _new_weights(zoo, name="mlp"):
    module = zoo.MODELS[name].module()
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(-0.5).add_(0.1)
        for b in module.buffers():
            if b.is_floating_point():
                b.add_(1.0)
    return module


def _by_constant_name(runner, state_dict):
    to_name = {fqn: name for name, fqn in runner.get_constant_names_to_original_fqns().items()}
    return {to_name[fqn]: t.contiguous() for fqn, t in state_dict.items() if fqn in to_name}


def test_constant_buffer_lifecycle(model_package, zoo):
    model = _fresh(model_package)
    runner = model.runner
    old, new = zoo.MODELS["mlp"].module(), _new_weights(zoo)
    x = zoo.MODELS["mlp"].inputs(3)
    new_map = _by_constant_name(runner, new.state_dict())
    assert len(new_map) == 5  # every parameter and buffer is updatable

    runner.update_constant_buffer(new_map, use_inactive=True, validate_full_updates=True)
    with torch.no_grad():
        _allclose(runner.run(list(x)), [old(*x)])  # active buffer still serves old weights
        inactive = runner.extract_constants_map(True)
        for fqn, tensor in new.state_dict().items():
            assert torch.equal(inactive[fqn], tensor), fqn
        runner.swap_constant_buffer()
        _allclose(runner.run(list(x)), [new(*x)])
        runner.free_inactive_constant_buffer()
        _allclose(runner.run(list(x)), [new(*x)])
    model.close()


def test_partial_update_with_validation_is_refused(model_package, zoo):
    model = _fresh(model_package)
    runner = model.runner
    partial = dict(list(_by_constant_name(runner, _new_weights(zoo).state_dict()).items())[:2])
    with pytest.raises(ValueError, match="validate_full_updates is set but the map has no"):
        runner.update_constant_buffer(partial, use_inactive=True, validate_full_updates=True)
    model.close()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: t.double(), "must be Float, got Double"),
        (lambda t: torch.zeros(t.numel() + 3), "must have shape"),
        (lambda t: t.reshape(-1) if t.dim() > 1 else t.reshape(1, -1), "must have shape"),
    ],
)
def test_bad_constant_update_leaves_weights_unchanged(model_package, zoo, mutate, message):
    model = _fresh(model_package)
    runner = model.runner
    x = zoo.MODELS["mlp"].inputs(3)
    before = runner.run(list(x))
    name = next(
        n for n, fqn in runner.get_constant_names_to_original_fqns().items() if fqn == "fc1.weight"
    )
    current = runner.extract_constants_map(False)["fc1.weight"]
    for use_inactive in (False, True):
        with pytest.raises(ValueError, match=message):
            runner.update_constant_buffer({name: mutate(current.clone())}, use_inactive, False)
    with pytest.raises(ValueError, match="'nope' is not a constant"):
        runner.update_constant_buffer({"nope": torch.zeros(3)}, False, False)
    _allclose(runner.run(list(x)), before)
    model.close()


def test_update_from_blob(model_package, zoo, tmp_path):
    model = _fresh(model_package, "blob_mlp")
    runner = model.runner
    x = zoo.MODELS["blob_mlp"].inputs(3)
    expected = zoo.eager("blob_mlp", x)
    # Overwrite the live weights, then restore them from the package's blob.
    zeros = {
        n: torch.zeros_like(t)
        for n, t in _by_constant_name(runner, runner.extract_constants_map(False)).items()
    }
    runner.update_constant_buffer(zeros, False, False)
    assert not torch.allclose(runner.run(list(x))[0], expected[0])
    with zipfile.ZipFile(model.source) as zf:
        member = next(n for n in zf.namelist() if n.endswith("_weights.blob"))
        blob = tmp_path / "weights.blob"
        blob.write_bytes(zf.read(member))
    runner.update_constant_buffer_from_blob(str(blob))
    _allclose(runner.run(list(x)), expected)
    model.close()


# --- bad input never crashes ------------------------------------------------


@pytest.mark.parametrize(
    "make, exc, message",
    [
        (lambda x: [], ValueError, "takes 1 input tensor"),
        (lambda x: [x, x], ValueError, "takes 1 input tensor"),
        (lambda x: [x.double()], RuntimeError, "unmatched dtype"),
        (lambda x: [x[:, :10]], RuntimeError, "unmatched"),
        (lambda x: [x.reshape(-1)], RuntimeError, "unmatched"),
        (lambda x: [torch.randn(2000, 64)], RuntimeError, "too large"),
    ],
)
def test_bad_inputs_raise(loaded, zoo, make, exc, message):
    runner = loaded("mlp").runner
    x = zoo.MODELS["mlp"].inputs(4)[0]
    with pytest.raises(exc, match=f"{message}|{OLD_TORCH_FAILURE}"):
        runner.run(make(x))
    assert runner.run([x])[0].shape == (4, 10)  # still serving


def test_bad_paths_raise(tmp_path):
    with pytest.raises(rx.PackageError, match="does not exist"):
        rx.load_model(tmp_path / "missing.pt2")
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(rx.PackageError, match="not a valid .pt2"):
        rx.load_model(corrupt)
    empty = tmp_path / "empty.pt2"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("empty/archive_format", "pt2")
    with pytest.raises(rx.PackageError, match="contains no AOTInductor model"):
        rx.load_model(empty)
    with pytest.raises(RuntimeError):
        rx.AOTIModelContainerRunnerCpu(str(tmp_path / "missing.so"), 1)
    with pytest.raises(ValueError, match="unknown device type"):
        rx.runner_class_for("tpu")


def test_truncated_library_raises(model_package, tmp_path):
    with zipfile.ZipFile(model_package("mlp")) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".wrapper.so"))
        data = zf.read(member)
    so = tmp_path / "truncated.so"
    so.write_bytes(data[:64] + b"\0" * 100)
    with pytest.raises(RuntimeError):
        rx.AOTIModelContainerRunnerCpu(str(so), 1)


def test_package_for_other_device_is_refused(model_package):
    with pytest.raises(rx.PackageError, match="was compiled for 'cpu', not for 'cuda:0'"):
        rx.load_model(model_package("mlp"), device="cuda")


def test_run_releases_the_gil(loaded, zoo):
    """A Python thread keeps running while another thread is inside run()."""
    runner = loaded("mlp", num_runners=2).runner
    x = torch.randn(1024, 64)
    stop = threading.Event()
    ticks = []

    def spin():
        while not stop.is_set():
            ticks.append(1)

    t = threading.Thread(target=spin)
    t.start()
    try:
        for _ in range(200):
            runner.run([x])
    finally:
        stop.set()
        t.join()
    assert ticks  # the spinner got the GIL while run() was executing


def _runner_outlives_its_loaded_model(path, device: str, zoo, name: str) -> None:
    import gc
    import os

    loaded = rx.load_model(path, device=device)
    folder = loaded._workdir
    runner = loaded.runner
    del loaded
    gc.collect()
    assert os.path.isdir(folder)  # the unpacked files live as long as the runner
    inputs = zoo.MODELS[name].inputs(3)
    _allclose(
        [o.cpu() for o in runner.run([t.to(device) for t in inputs])], zoo.eager(name, inputs)
    )
    # Closing a LoadedModel drops its reference only: a runner held elsewhere still runs.
    other = rx.load_model(path, device=device)
    held = other.runner
    other.close()
    _allclose([o.cpu() for o in held.run([t.to(device) for t in inputs])], zoo.eager(name, inputs))
    del runner
    gc.collect()
    assert not os.path.isdir(folder)  # ...and go with its last reference


def test_runner_outlives_its_loaded_model(model_package, zoo):
    """`load_model(pkg).runner` used after the LoadedModel is dropped still runs (issue 18)."""
    _runner_outlives_its_loaded_model(model_package("plain_two_io"), "cpu", zoo, "plain_two_io")
    runner = rx.load_model(model_package("mlp")).runner  # the one-line idiom
    inputs = zoo.MODELS["mlp"].inputs(2)
    _allclose(runner.run(list(inputs)), zoo.eager("mlp", inputs))


@pytest.mark.cuda
def test_cuda_runner_outlives_its_loaded_model(zoo):
    """On CUDA the kernels load lazily from the unpacked files, at the first run."""
    import model_zoo

    _runner_outlives_its_loaded_model(model_zoo.compiled("mlp", device="cuda"), "cuda", zoo, "mlp")


@pytest.mark.cuda
@pytest.mark.parametrize("name", TEST_MODELS)
def test_cuda_run_matches_eager(model_package, zoo, name, tmp_path):
    import model_zoo

    path = model_zoo.compiled(name, device="cuda")
    model = rx.load_model(path, device="cuda")
    inputs = zoo.MODELS[name].inputs(3)
    expected = zoo.eager(name, inputs)
    stream = torch.cuda.Stream()
    outputs = model.runner.run([t.cuda() for t in inputs], stream.cuda_stream)
    stream.synchronize()
    _allclose([o.cpu() for o in outputs], expected)
    outputs = model.runner.run([t.cuda() for t in inputs])
    _allclose([o.cpu() for o in outputs], expected)
    model.close()


@pytest.mark.cuda
def test_cuda_constant_buffer_lifecycle(zoo):
    import model_zoo

    model = rx.load_model(model_zoo.compiled("mlp", device="cuda"), device="cuda")
    runner = model.runner
    new = _new_weights(zoo)
    x = zoo.MODELS["mlp"].inputs(3)
    new_map = {k: v.cuda() for k, v in _by_constant_name(runner, new.state_dict()).items()}
    runner.update_constant_buffer(new_map, True, True)
    with torch.no_grad():
        _allclose([o.cpu() for o in runner.run([x[0].cuda()])], [zoo.MODELS["mlp"].module()(*x)])
        runner.swap_constant_buffer()
        _allclose([o.cpu() for o in runner.run([x[0].cuda()])], [new(*x)])
        with pytest.raises(ValueError, match="must be on"):
            runner.update_constant_buffer(
                {next(iter(new_map)): next(iter(new_map.values())).cpu()}, True, False
            )
    model.close()


def test_swap_without_staged_weights_is_refused(model_package, zoo):
    model = _fresh(model_package)
    runner = model.runner
    x = zoo.MODELS["mlp"].inputs(2)
    before = runner.run(list(x))
    with pytest.raises(RuntimeError, match="inactive buffer holds no"):
        runner.swap_constant_buffer()
    new_map = _by_constant_name(runner, _new_weights(zoo).state_dict())
    runner.update_constant_buffer(new_map, True, True)
    runner.swap_constant_buffer()
    runner.swap_constant_buffer()  # back: the inactive buffer held the old weights
    _allclose(runner.run(list(x)), before)
    runner.free_inactive_constant_buffer()
    assert runner.extract_constants_map(True) == {}
    with pytest.raises(RuntimeError, match="inactive buffer holds no"):
        runner.swap_constant_buffer()
    _allclose(runner.run(list(x)), before)
    model.close()


@pytest.mark.parametrize("name", ["mlp", "blob_mlp"])
def test_staging_after_freeing_a_once_active_buffer(model_package, zoo, name):
    """torch's free leaves a once-active buffer unusable (a later update crashes)."""
    model = _fresh(model_package, name)
    runner = model.runner
    x = zoo.MODELS[name].inputs(3)
    live = runner.extract_constants_map(False)
    to_name = {fqn: n for n, fqn in runner.get_constant_names_to_original_fqns().items()}
    for step in range(3):
        scaled = {to_name[fqn]: t * (1.1 + step) for fqn, t in live.items()}
        runner.update_constant_buffer(scaled, True, True)
        runner.swap_constant_buffer()
        runner.run(list(x))
        runner.free_inactive_constant_buffer()
        partial = dict(list(scaled.items())[:1])
        runner.update_constant_buffer(partial, True, False)  # rest filled from the active buffer
        runner.swap_constant_buffer()
        runner.run(list(x))


def test_user_managed_tensors_stay_alive(model_package, zoo):
    model = _fresh(model_package)
    runner = model.runner
    new = _new_weights(zoo)
    x = zoo.MODELS["mlp"].inputs(2)
    runner.update_constant_buffer(
        _by_constant_name(runner, new.state_dict()), True, True, user_managed=True
    )
    import gc

    gc.collect()
    runner.swap_constant_buffer()
    with torch.no_grad():
        _allclose(runner.run(list(x)), [new(*x)])
    model.close()


@pytest.mark.parametrize("spin_us", [0, 1000])
def test_slot_thread_hands_every_task_over_and_back(spin_us):
    """--gpu-slot-threads' hand-off (slot_thread.h), device-free: 4 callers take turns
    handing 500 tasks each to one thread, sleeping at once or spinning first; every task
    runs on the slot's thread, every caller gets its own answer, and every 7th task's
    exception comes back to the caller that handed it over."""
    right, errors, wrong, elsewhere = rx._C._slot_thread_check(4, 500, spin_us, 7)
    assert (right + errors, wrong, elsewhere) == (2000, 0, 0)
    assert errors == 2000 // 7
