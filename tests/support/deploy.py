"""The deployment files' layout and readers (tests/integration/test_deploy.py, test_deploy_tls.py):
where deploy/ is, YAML documents, and a kustomization's resources and generated ConfigMaps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
KUBERNETES_VERSION = "1.37"
KUSTOMIZATIONS = {"base": DEPLOY / "kubernetes", "sidecar": DEPLOY / "kubernetes" / "sidecar"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def document(path: Path) -> dict[str, Any]:
    [only] = documents(path)
    return only


@dataclass(frozen=True)
class Kustomization:
    directory: Path

    @property
    def spec(self) -> dict[str, Any]:
        return document(self.directory / "kustomization.yaml")

    def resources(self) -> list[tuple[Path, dict[str, Any]]]:
        return [
            (self.directory / name, resource)
            for name in self.spec.get("resources", [])
            for resource in documents(self.directory / name)
        ]

    def generated(self) -> dict[str, dict[str, Path]]:
        """ConfigMap name -> {key: file} for each configMapGenerator entry."""
        return {
            entry["name"]: {Path(f).name: self.directory / f for f in entry.get("files", [])}
            for entry in self.spec.get("configMapGenerator", [])
        }

    def objects(self) -> list[dict[str, Any]]:
        """Every object `kubectl apply -k` would send, the generated ConfigMaps included."""
        config_maps = [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name},
                "data": {key: file.read_text(encoding="utf-8") for key, file in files.items()},
            }
            for name, files in self.generated().items()
        ]
        return [resource for _, resource in self.resources()] + config_maps

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects() if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        [only] = self.of_kind(kind)
        return only
