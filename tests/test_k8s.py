"""docker/k8s/: the manifests validate offline against a current Kubernetes API's schemas
(PyPI ``kubernetes-validate``, which ships them), and the loaders, their Service and the
trainer's endpoint list agree on names, ports, replicas, keys and /dev/shm size."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_docker import ring_bytes

from ringfeed.endpoints import expand_endpoints

K8S = Path(__file__).resolve().parents[1] / "docker" / "k8s"
KUBERNETES_VERSION = "1.35"  # a current release; kubernetes-validate 1.37 ships schemas up to 1.37
MANIFESTS = sorted(K8S.glob("*.yaml"))
QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def resources() -> dict[str, dict]:
    out = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            out[doc["kind"]] = doc
    return out


def flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def quantity(text: str) -> int:
    number, unit = text[:-2], text[-2:]
    assert unit in QUANTITY and number.isdigit(), f"expected e.g. 1Gi, got {text!r}"
    return int(number) * QUANTITY[unit]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(path):
    import kubernetes_validate

    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error


def test_a_manifest_with_a_typo_is_refused():
    import kubernetes_validate

    job = resources()["Job"]
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Never"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)


def _pod(workload: dict) -> tuple[dict, dict]:
    spec = workload["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    return spec, container


def test_names_ports_replicas_and_keys_agree():
    docs = resources()
    service, loaders, job = docs["Service"], docs["StatefulSet"], docs["Job"]
    pod, loader = _pod(loaders)
    _, trainer = _pod(job)
    # the headless Service gives each StatefulSet pod the name <statefulset>-<i>.<service>
    assert service["spec"]["clusterIP"] == "None"
    assert loaders["spec"]["serviceName"] == service["metadata"]["name"]
    labels = loaders["spec"]["template"]["metadata"]["labels"]
    assert loaders["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    (container_port,) = loader["ports"]
    assert port["targetPort"] == container_port["name"] and port["port"] == container_port["containerPort"]
    assert flag(loader["command"], "--endpoint") == f"tcp://0.0.0.0:{container_port['containerPort']}"

    env = {e["name"]: e["value"] for e in trainer["env"]}
    name, replicas = loaders["metadata"]["name"], loaders["spec"]["replicas"]
    assert expand_endpoints(env["RINGFEED_ENDPOINT"]) == [
        f"tcp://{name}-{i}.{service['metadata']['name']}:{port['port']}" for i in range(replicas)]

    # CURVE: one Secret; the loader admits the client key that the trainer and the probe hold
    secret = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}["keys"]
    mounted = {m["name"]: m["mountPath"] for m in loader["volumeMounts"]}
    files = {item["path"]: item["key"] for item in secret["items"]}
    keys_dir = mounted["keys"]
    assert flag(loader["command"], "--curve-secret-key") == f"{keys_dir}/{_path(files, 'server.key_secret')}"
    assert flag(loader["command"], "--curve-authorized-keys") == f"{keys_dir}/authorized"
    assert files["authorized/client.key"] == "client.key"
    probe = loader["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["ringfeed", "status"] and flag(probe, "--endpoint").endswith(f":{port['port']}")
    trainer_pod, _ = _pod(job)
    trainer_secret = {v["name"]: v["secret"] for v in trainer_pod["volumes"] if "secret" in v}["keys"]
    assert trainer_secret["secretName"] == secret["secretName"]
    trainer_files = {item["path"] for item in trainer_secret["items"]}
    for path in (env["RINGFEED_CURVE_SERVER_KEY"], env["RINGFEED_CURVE_SECRET_KEY"],
                 flag(probe, "--curve-server-key"), flag(probe, "--curve-secret-key")):
        assert path.startswith("/keys/") and path.removeprefix("/keys/") in files
    assert {p.removeprefix("/keys/") for p in (env["RINGFEED_CURVE_SERVER_KEY"],
                                               env["RINGFEED_CURVE_SECRET_KEY"])} == trainer_files
    assert "server.key_secret" not in trainer_files  # the trainer never holds the server's secret


def _path(files: dict[str, str], key: str) -> str:
    (path,) = [p for p, k in files.items() if k == key]
    return path


def test_shm_is_memory_backed_and_holds_the_ring_with_room_to_spare():
    pod, loader = _pod(resources()["StatefulSet"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = {m["mountPath"]: m["name"] for m in loader["volumeMounts"]}["/dev/shm"]
    empty_dir = volumes[shm]["emptyDir"]
    assert empty_dir["medium"] == "Memory"
    needed = ring_bytes(int(flag(loader["command"], "--batch-size")), int(flag(loader["command"], "--workers")))
    assert quantity(empty_dir["sizeLimit"]) >= 2 * needed
    # memory-backed /dev/shm counts against the pod's memory: the limit must hold it
    assert quantity(loader["resources"]["limits"]["memory"]) > quantity(empty_dir["sizeLimit"])


def test_requests_leave_a_core_per_worker():
    _, loader = _pod(resources()["StatefulSet"])
    workers = int(flag(loader["command"], "--workers"))
    assert int(loader["resources"]["requests"]["cpu"]) >= workers + 1  # and one for the broker
