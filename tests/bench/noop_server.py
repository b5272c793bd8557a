"""E2's authorizer: a grpc.aio ext_authz server that answers OK without looking at anything.

``--sync N`` serves the same answer from grpc's sync server with a thread pool of N (E2s, the
floor issue 13 measures against as well).

The floor of any Python design: the same gRPC stack, event loop and generated protos as ext-authz,
and no work at all per Check beyond what gRPC does. ``python -m tests.bench.noop_server --listen
127.0.0.1:0`` logs ``{"event": "serving", "address": "HOST:PORT"}`` on standard error once bound,
and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import threading
from concurrent import futures

import grpc
from google.rpc import status_pb2

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

# Built once: every Check gets the same answer.
OK = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=0))


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> external_auth_pb2.CheckResponse:
        return OK


class SyncNoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):
    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        return OK


def serve_sync(listen: str, threads: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(SyncNoopAuthorization(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(listen)
    server.start()
    address = f"{listen.rpartition(':')[0]}:{port}"
    print(json.dumps({"event": "serving", "address": address}), file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(0).wait()


async def serve(listen: str) -> None:
    # As ext-authz: one process owns its port (gRPC would otherwise set SO_REUSEPORT).
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port(listen)
    await server.start()
    address = f"{listen.rpartition(':')[0]}:{port}"
    print(json.dumps({"event": "serving", "address": address}), file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument(
        "--sync", type=int, default=0, metavar="THREADS", help="grpc's sync server, N threads"
    )
    args = parser.parse_args()
    if args.sync:
        serve_sync(args.listen, args.sync)
    else:
        asyncio.run(serve(args.listen))


if __name__ == "__main__":
    main()
