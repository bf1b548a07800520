"""KServe: the aotiserve serving runtime and the InferenceService examples (deploy/kserve).

Rendered with the real kustomize, validated against KServe's own CRD schemas (vendored
and pinned in deploy/schemas/, see its README) with unknown fields refused, as the API
server's strict field validation does; then checked for what KServe and the daemon rely
on: the runtime's flags are ones `aotiserve serve` takes, the model comes from
/mnt/models, probes and port agree, the admin token is a Secret file. One test starts the
daemon with the runtime's own flags and env and calls the model by its file name.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

from deploy_helpers import render, validate_crd  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KSERVE = REPO / "deploy" / "kserve"
# The oldest KServe release the manifests support and the newest pinned.
KSERVE_VERSIONS = ("v0.15.2", "v0.20.0")
SCHEMA_FILES = {
    "ServingRuntime": "servingruntimes.json",
    "ClusterServingRuntime": "clusterservingruntimes.json",
    "InferenceService": "inferenceservices.json",
}
EXAMPLES = ("inferenceservice-cpu.yaml", "inferenceservice-gpu.yaml")
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts the storageUri


# ------------------------------------------------------------------ schemas


def validate_kserve(doc: dict, version: str) -> None:
    validate_crd(doc, f"kserve-{version}", SCHEMA_FILES[doc["kind"]])


# ---------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def runtime() -> dict:
    (doc,) = render(KSERVE / "runtime")
    return doc


@pytest.fixture(scope="module")
def cluster_runtime() -> dict:
    (doc,) = render(KSERVE / "cluster-runtime")
    return doc


def example(name: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((KSERVE / "examples" / name).read_text()) if d]
    return doc


def container(runtime: dict) -> dict:
    (c,) = runtime["spec"]["containers"]
    return c


@pytest.mark.parametrize("version", KSERVE_VERSIONS)
def test_runtimes_validate_against_kserve_crds(runtime, cluster_runtime, version):
    assert runtime["kind"] == "ServingRuntime"
    assert cluster_runtime["kind"] == "ClusterServingRuntime"
    validate_kserve(runtime, version)
    validate_kserve(cluster_runtime, version)


@pytest.mark.parametrize("version", KSERVE_VERSIONS)
@pytest.mark.parametrize("name", EXAMPLES)
def test_inference_service_examples_validate(name, version):
    validate_kserve(example(name), version)


def test_validation_refuses_what_kserve_refuses(runtime):
    """The validator is live: a misspelt field, a wrong type and a missing required field
    each fail, as the API server would refuse them."""
    bad = []
    typo = copy.deepcopy(runtime)
    typo["spec"]["protocolVersion"] = ["grpc-v2"]  # the field is protocolVersions
    bad.append(typo)
    wrong_type = copy.deepcopy(runtime)
    container(wrong_type)["ports"][0]["containerPort"] = "8500"
    bad.append(wrong_type)
    missing = copy.deepcopy(runtime)
    del container(missing)["name"]
    bad.append(missing)
    for doc in bad:
        with pytest.raises(pytest.fail.Exception):
            validate_kserve(doc, KSERVE_VERSIONS[0])


def test_cluster_runtime_is_the_namespaced_one(runtime, cluster_runtime):
    assert cluster_runtime["spec"] == runtime["spec"]
    assert cluster_runtime["metadata"]["name"] == runtime["metadata"]["name"] == "aotiserve"


def test_runtime_serves_pt2_over_grpc_v2(runtime):
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"]
    (fmt,) = spec["supportedModelFormats"]
    assert fmt["name"] == "pytorch-aoti" and fmt["autoSelect"] is True
    assert container(runtime)["name"] == "kserve-container"  # what KServe merges into


def serve_config(runtime: dict, env_overrides: list[dict] = ()):
    """The daemon's settings from the container's flags and env, as `aotiserve serve`
    resolves them (an InferenceService's env entries replace the runtime's by name)."""
    from aotiserve.server.cli import build_parser
    from aotiserve.server.config import ServeConfig

    c = container(runtime)
    env = {e["name"]: e["value"] for e in c.get("env", [])}
    env.update({e["name"]: e["value"] for e in env_overrides})
    args = build_parser().parse_args(c.get("args", []))
    return ServeConfig.from_sources(args, env)


def test_runtime_flags_serve_the_downloaded_model(runtime):
    config = serve_config(runtime)
    assert config.model_repository == MODEL_DIR
    assert not config.serve_demo
    assert config.host == "0.0.0.0"  # the kubelet probes and KServe route to the pod IP
    assert config.devices == ("cpu",)
    assert not config.insecure_admin and config.admin_token_file
    c = container(runtime)
    (port,) = c["ports"]
    assert port["name"] == "h2c" and port["containerPort"] == config.port  # HTTP/2 to KServe
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(c[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert c[probe]["grpc"]["port"] == config.port, probe
        assert c[probe]["grpc"].get("service", "") == "", probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    annotations = runtime["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(config.metrics_port)
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    # SIGTERM after preStop; the drain must end inside the pod's default 30 s grace.
    pre_stop = float(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pre_stop + config.grace_period_s + config.drain_delay_s + 5 <= 30


def test_runtime_admin_token_is_a_secret_file(runtime):
    config = serve_config(runtime)
    token = Path(config.admin_token_file)
    c = container(runtime)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    mount = mounts[str(token.parent)]
    assert mount["readOnly"] is True
    volume = {v["name"]: v for v in runtime["spec"]["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == "aotiserve-admin-token"
    assert [i["path"] for i in volume["secret"]["items"]] == [token.name]
    assert volume["secret"]["defaultMode"] & 0o022 == 0  # nobody may write it
    assert not any("TOKEN" in e["name"] and "FILE" not in e["name"] for e in c.get("env", []))


def test_runtime_container_is_locked_down(runtime):
    c = container(runtime)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in runtime["spec"]["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]  # packages unpack there
    assert MODEL_DIR not in mounts  # KServe mounts the downloaded model itself
    assert c["image"].startswith("registry.example.com/aotiserve/aotiserve:")
    assert "cpu" not in c["resources"].get("limits", {})  # no CFS throttling


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_select_this_runtime(runtime, name):
    isvc = example(name)
    model = isvc["spec"]["predictor"]["model"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model.get("runtime", runtime["metadata"]["name"]) == runtime["metadata"]["name"]
    assert model["storageUri"].split("://")[0] in ("gs", "s3", "pvc", "https", "hf", "oci")
    config = serve_config(runtime, model.get("env", []))
    assert config.runners_per_model >= 1


def test_cpu_example_has_no_gpu(runtime):
    isvc = example("inferenceservice-cpu.yaml")
    assert "nvidia.com/gpu" not in yaml.safe_dump(isvc)
    model = isvc["spec"]["predictor"]["model"]
    assert serve_config(runtime, model.get("env", [])).devices == ("cpu",)
    assert model["storageUri"].endswith(".pt2")  # one package, served as "resnet50"


def test_gpu_example_schedules_on_a_gpu(runtime):
    isvc = example("inferenceservice-gpu.yaml")
    predictor = isvc["spec"]["predictor"]
    model = predictor["model"]
    assert int(model["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor[
        "tolerations"
    ]
    assert model["runtimeVersion"].endswith("-cuda")
    assert serve_config(runtime, model["env"]).devices == ("cuda:0",)
    assert model["storageUri"].endswith("/")  # a folder of packages


def test_storage_layouts_name_the_models(tmp_path):
    """What the storage initializer leaves in /mnt/models: a single object keeps its file
    name; a folder its files. The repository scan names models by file stem."""
    from aotiserve.server.model_repository import repository_models

    single = tmp_path / "single"
    single.mkdir()
    (single / "resnet50.pt2").touch()
    assert list(repository_models(single)) == ["resnet50"]
    folder = tmp_path / "folder"
    folder.mkdir()
    for f in ("resnet50.pt2", "resnet50.cuda.pt2", "resnet50.toml", "bert.pt2"):
        (folder / f).touch()
    models = repository_models(folder)
    assert sorted(models) == ["bert", "resnet50"]
    assert models["resnet50"][1] == {"cuda": str(folder / "resnet50.cuda.pt2")}


def test_daemon_starts_with_the_runtime_flags(runtime, tmp_path, model_package):
    """The runtime's own flags and env, with /mnt/models, the token file and the ports
    moved to this machine: the daemon serves the downloaded package under its stem and
    takes mutating calls only with the token."""
    import grpc
    import model_zoo
    import numpy as np
    from server_harness import start_daemon

    from aotiserve.client import Client, ClientError

    models = tmp_path / "mnt-models"
    models.mkdir()
    shutil.copyfile(model_package("mlp"), models / "resnet50.pt2")  # one object's download
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o444)
    c = container(runtime)
    moved = {MODEL_DIR: str(models), "/etc/aotiserve/admin/token": str(token)}
    args = []
    for arg in c["args"]:
        flag, _, value = arg.partition("=")
        if flag in ("--port", "--metrics-port"):
            value = "0"
        elif flag == "--host":
            value = "127.0.0.1"
        args.append(f"{flag}={moved.get(value, value)}" if value else flag)
    env = {e["name"]: e["value"] for e in c["env"]}
    with_flags = [a for a in args if not a.startswith("--model-repository")]
    d = start_daemon([], [*with_flags, f"--model-repository={models}"], repo=models, env=env)
    try:
        client = Client(d.target)
        assert client.health() == "SERVING"
        (x,) = model_zoo.MODELS["mlp"].inputs(batch=3)
        (out,) = client.model("resnet50").run([x.numpy()])
        (want,) = model_zoo.eager("mlp", (x,))
        np.testing.assert_allclose(out, want.numpy(), rtol=1e-4, atol=1e-5)
        handle = client.model("resnet50")
        with pytest.raises(ClientError) as err:
            handle.free_inactive_constant_buffer()  # mutating, no token
        assert err.value.code in (
            grpc.StatusCode.UNAUTHENTICATED,
            grpc.StatusCode.PERMISSION_DENIED,
        )
        client.close()
    finally:
        d.proc.terminate()
        d.proc.wait(30)
