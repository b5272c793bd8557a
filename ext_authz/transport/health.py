"""The standard grpc.health.v1 service, for Envoy health checks and Kubernetes gRPC probes.

grpc's own servicer: thread-safe, and its Watch streams hold no request thread (non-blocking).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import HealthServicer

AUTHORIZATION_SERVICE = "envoy.service.auth.v3.Authorization"
# SERVING for as long as the process runs: for liveness probes, which must not restart replicas
# that are alive but waiting for keys (an IdP outage) or draining.
LIVENESS_SERVICE = "liveness"


class Health:
    """Reports the same status for the whole server ("") and for the Authorization service."""

    def __init__(self) -> None:
        self._servicer = HealthServicer(experimental_non_blocking=True)

    def register(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, server)

    def set_alive(self) -> None:
        self._servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", AUTHORIZATION_SERVICE):
            self._servicer.set(service, status)
