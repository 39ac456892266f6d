"""A Prometheus registry of one's own and its ``/metrics`` server, for a component that exports
metrics apart from a web app (the trainer, the vLLM pod's reconciler). prometheus_client is imported
when one is made: it comes with the train and serve extras, not with the base distribution."""

from __future__ import annotations

from typing import Any


class MetricsEndpoint:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)
        self._server: Any = None  # wsgiref's server, from start_http_server
        self._thread: Any = None

    def render(self) -> bytes:
        """The registry in Prometheus's text format."""
        from prometheus_client.exposition import generate_latest

        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the port (0 picks a free one)."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
