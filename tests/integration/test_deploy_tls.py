"""The TLS deployment files, checked offline like the others (see test_deploy.py):

- deploy/kubernetes-tls/: the overlay is rendered here (the base's objects, the replaced ConfigMap,
  the RFC 6902 patch) and, where `kubectl` is installed, compared with `kubectl kustomize`; every
  Kubernetes object against the Kubernetes 1.37 schemas (strict), the cert-manager Certificate
  against a JSON schema written here from cert-manager's API reference (cert-manager.io/v1
  CertificateSpec; no CRD is available offline, so this is our reading of the API).
- The overlay's ext-authz config: `ext-authz check-config` with certificates made on the spot
  where the Secret would put them.
- deploy/envoy/ext-authz-tls-cluster.yaml: spliced into envoy.yaml in place of the plaintext
  ext_authz cluster and run through `envoy --mode validate` (its files made on the spot).
- Cross-references: Secret, mount, paths, probes, names Envoy verifies, ports.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from ext_authz import cli
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
from tests.support.tls import CertificateAuthority, write_files

OVERLAY = DEPLOY / "kubernetes-tls"
TLS_CLUSTER = DEPLOY / "envoy" / "ext-authz-tls-cluster.yaml"
CONFIG_DIR = "/etc/ext-authz"


# ---- rendering the overlay -----------------------------------------------------------------------


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def json_patch(target: Any, operations: list[dict[str, Any]]) -> Any:
    """RFC 6902 test, add and replace: the operations the overlay uses."""
    result = copy.deepcopy(target)
    for operation in operations:
        *parents, last = _pointer(operation["path"])
        node = result
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        op = operation["op"]
        if op == "test":
            actual = node[int(last)] if isinstance(node, list) else node[last]
            assert actual == operation["value"], operation
        elif op == "add" and isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), operation["value"])
        elif op in ("add", "replace"):
            if isinstance(node, list):
                node[int(last)] = operation["value"]
            else:
                assert op == "add" or last in node, operation
                node[last] = operation["value"]
        else:
            raise AssertionError(f"unsupported operation {operation}")
    return result


def render_overlay() -> list[dict[str, Any]]:
    """What `kubectl kustomize deploy/kubernetes-tls` gives, rendered for the files the overlay uses."""
    spec = document(OVERLAY / "kustomization.yaml")
    assert spec["resources"][0] == "../kubernetes"
    base = Kustomization(KUSTOMIZATIONS["base"])
    objects = base.objects()
    for entry in spec["configMapGenerator"]:
        assert entry["behavior"] == "replace"
        [config_map] = [
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == entry["name"]
        ]
        config_map["data"] = {Path(f).name: (OVERLAY / f).read_text(encoding="utf-8") for f in entry["files"]}
    for patch in spec["patches"]:
        target = patch["target"]
        operations = yaml.safe_load((OVERLAY / patch["path"]).read_text(encoding="utf-8"))
        for index, resource in enumerate(objects):
            if resource["kind"] == target["kind"] and resource["metadata"]["name"] == target["name"]:
                objects[index] = json_patch(resource, operations)
    for name in spec["resources"][1:]:
        objects += documents(OVERLAY / name)
    for resource in objects:
        if resource["kind"] != "Namespace":
            resource["metadata"]["namespace"] = spec["namespace"]
    return objects


@pytest.fixture(scope="module")
def overlay() -> list[dict[str, Any]]:
    return render_overlay()


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [only] = [o for o in objects if o["kind"] == kind]
    return only


def _normalised(objects: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load(yaml.safe_dump(objects))}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_overlay_renders_as_kustomize_renders_it(overlay: list[dict[str, Any]]) -> None:
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60, check=True
    )
    theirs = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    ours = _normalised(overlay)
    # kustomize also applies the base's images: transformer and its own labels; compare what we render.
    for key, resource in _normalised(theirs).items():
        if key[0] == "Deployment":
            resource["spec"]["template"]["spec"]["containers"][0]["image"] = ours[key]["spec"]["template"][
                "spec"
            ]["containers"][0]["image"]
    assert _normalised(theirs) == ours


# ---- schemas -------------------------------------------------------------------------------------


def test_overlay_objects_match_the_kubernetes_schemas(overlay: list[dict[str, Any]]) -> None:
    kinds = [o["kind"] for o in overlay]
    assert "Certificate" in kinds and "Deployment" in kinds
    for resource in overlay:
        if resource["kind"] == "Certificate":
            jsonschema.validate(resource, CERTIFICATE_SCHEMA)
        else:
            assert (
                kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
            )


_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}  # Go time.Duration
_STRINGS = {"type": "array", "items": {"type": "string", "minLength": 1}}
_USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
    "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
    "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc",
]  # fmt: skip
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"}


def _closed(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(required),
    }


# cert-manager.io/v1 Certificate (CertificateSpec, CertificatePrivateKey, ObjectReference).
CERTIFICATE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    **_closed(
        {
            "apiVersion": {"const": "cert-manager.io/v1"},
            "kind": {"const": "Certificate"},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": _NAME,
                    "namespace": _NAME,
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            },
            "spec": _closed(
                {
                    "secretName": _NAME,
                    "secretTemplate": _closed(
                        {
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                        }
                    ),
                    "issuerRef": _closed(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "kind": {"type": "string", "minLength": 1},
                            "group": {"type": "string", "minLength": 1},
                        },
                        required=("name",),
                    ),
                    "commonName": {"type": "string", "maxLength": 64},
                    "literalSubject": {"type": "string"},
                    "subject": {"type": "object"},
                    "dnsNames": _STRINGS,
                    "ipAddresses": _STRINGS,
                    "uris": _STRINGS,
                    "emailAddresses": _STRINGS,
                    "otherNames": {"type": "array"},
                    "duration": _DURATION,
                    "renewBefore": _DURATION,
                    "renewBeforePercentage": {"type": "integer", "minimum": 1, "maximum": 99},
                    "isCA": {"type": "boolean"},
                    "usages": {"type": "array", "items": {"enum": _USAGES}},
                    "privateKey": _closed(
                        {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]},
                            "size": {"type": "integer"},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                        }
                    ),
                    "encodeUsagesInRequest": {"type": "boolean"},
                    "revisionHistoryLimit": {"type": "integer", "minimum": 1},
                    "additionalOutputFormats": {"type": "array"},
                    "keystores": {"type": "object"},
                    "nameConstraints": {"type": "object"},
                },
                required=("secretName", "issuerRef"),
            ),
        },
        required=("apiVersion", "kind", "metadata", "spec"),
    ),
}


@pytest.mark.parametrize(
    "mistake",
    [
        lambda s: s.update(dnsName=s["dnsNames"]),
        lambda s: s.pop("issuerRef"),
        lambda s: s.pop("secretName"),
        lambda s: s.update(usages=["server-auth"]),
        lambda s: s.update(renewBefore="15d"),
        lambda s: s["privateKey"].update(rotationPolicy="always"),
    ],
    ids=["typo", "no-issuer", "no-secret", "usage", "duration", "rotation-policy"],
)
def test_certificate_schema_rejects_mistakes(mistake: Any) -> None:
    jsonschema.Draft202012Validator.check_schema(CERTIFICATE_SCHEMA)
    broken = document(OVERLAY / "certificate.yaml")
    mistake(broken["spec"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, CERTIFICATE_SCHEMA)


# ---- wiring --------------------------------------------------------------------------------------


def test_overlay_wiring(overlay: list[dict[str, Any]]) -> None:
    deployment = one(overlay, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    certificate = one(overlay, "Certificate")
    [config_map] = [o for o in overlay if o["kind"] == "ConfigMap"]
    config = yaml.safe_load(config_map["data"]["ext-authz.yaml"])
    base_config = document(KUSTOMIZATIONS["base"] / "ext-authz.yaml")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}

    # The base's config, plus tls with the admin listener over HTTPS.
    assert {k: v for k, v in config.items() if k != "tls"} == base_config
    assert config["tls"]["admin"] is True and "client_ca_file" in config["tls"]
    # ext-authz.yaml and the Secret's files in one projected volume at /etc/ext-authz.
    assert container["args"] == ["serve", "--config", f"{CONFIG_DIR}/ext-authz.yaml"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == CONFIG_DIR]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    sources = volume["projected"]["sources"]
    assert {"configMap": {"name": config_map["metadata"]["name"]}} in sources
    [secret] = [s["secret"] for s in sources if "secret" in s]
    assert secret["name"] == certificate["spec"]["secretName"]
    items = {item["path"]: item["key"] for item in secret["items"]}
    for field in ("cert_file", "key_file", "client_ca_file"):
        assert config["tls"][field] in items  # relative to the config file's directory
    assert {items[config["tls"][f]] for f in ("cert_file", "key_file", "client_ca_file")} == {
        "tls.crt", "tls.key", "ca.crt",
    }  # fmt: skip
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    # Probes: the admin listener over HTTPS (the kubelet's gRPC probes cannot speak TLS).
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe] == {
            **container[probe],
            "httpGet": {"path": path, "port": "admin", "scheme": "HTTPS"},
        }
    assert ports["admin"] == int(config["admin"].rpartition(":")[2])
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    # What Envoy verifies is what cert-manager puts in the certificate, and it reaches the Service.
    cluster = document(TLS_CLUSTER)
    tls_context = cluster["transport_socket"]["typed_config"]
    [san] = tls_context["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    service = next(s for s in overlay if s["kind"] == "Service" and s["spec"].get("clusterIP") != "None")
    dns_name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert tls_context["sni"] == san["matcher"]["exact"] == endpoint["socket_address"]["address"] == dns_name
    assert dns_name in certificate["spec"]["dnsNames"]
    assert endpoint["socket_address"]["port_value"] == service["spec"]["ports"][0]["port"]
    assert "server auth" in certificate["spec"]["usages"]


def test_overlay_config_passes_check_config_with_the_secrets_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority()
    write_files(tmp_path / "tls", ca.issue("ext-authz.ext-authz.svc.cluster.local"), ca)
    config = tmp_path / "ext-authz.yaml"
    shutil.copy(OVERLAY / "ext-authz.yaml", config)

    assert cli.main(["check-config", str(config)]) == 0, capsys.readouterr().err
    (tmp_path / "tls" / "tls.key").write_bytes(ca.issue().key_pem)  # another key: refused
    with pytest.raises(SystemExit) as exited:
        cli.main(["check-config", str(config)])
    assert exited.value.code == 2
    assert "tls.key_file" in capsys.readouterr().err


def test_tls_cluster_snippet_validates_inside_envoy_yaml(tmp_path: Path) -> None:
    reference = document(REPO_ROOT / "envoy.yaml")
    cluster = document(TLS_CLUSTER)
    [plain] = [c for c in reference["static_resources"]["clusters"] if c["name"] == "ext_authz"]
    # The same protocol options and timeout as envoy.yaml's plaintext cluster.
    for key in ("name", "connect_timeout", "typed_extension_protocol_options"):
        assert cluster[key] == plain[key], key
    common = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert common["alpn_protocols"] == ["h2"]
    assert common["validation_context"]["match_typed_subject_alt_names"]  # the name is verified

    ca = CertificateAuthority()
    write_files(tmp_path, ca.issue("envoy", client=True), ca)
    text = TLS_CLUSTER.read_text(encoding="utf-8").replace("/etc/envoy/ext-authz-client", str(tmp_path))
    spliced = copy.deepcopy(reference)
    spliced["static_resources"]["clusters"] = [
        yaml.safe_load(text) if c["name"] == "ext_authz" else c
        for c in reference["static_resources"]["clusters"]
    ]
    path = tmp_path / "envoy-tls.yaml"
    path.write_text(yaml.safe_dump(spliced))
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr
    # And Envoy does read those files: a missing one is an error.
    (tmp_path / "ca.crt").unlink()
    assert validate_config(path).returncode != 0
