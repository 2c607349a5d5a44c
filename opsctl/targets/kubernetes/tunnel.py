"""How opsctl, on this machine, reaches a server on the cluster: a listener on 127.0.0.1
whose every connection is a port-forward through the API server (as `kubectl port-forward
service/NAME` makes one) to a ready pod behind the server's Service. The configuration steps
talk to that listener as they talk to a local server. The listeners live as long as the run.
"""

from __future__ import annotations

import socket
import threading

from opsctl.errors import OpsError, first_line
from opsctl.net import Address

CHUNK = 65536


class Tunnels:
    def __init__(self, make_api):
        self._make_api = make_api
        self._open: dict[tuple[str, str, int], Address] = {}
        self._lock = threading.Lock()
        self._opening = threading.Lock()
        self._streams = None

    def reach(self, service: str, namespace: str, port: int) -> Address:
        """A local address that reaches port `port` of Service `service`, opened once."""
        key = (namespace, service, port)
        with self._lock:
            if key not in self._open:
                pod, pod_port = self._backend(service, namespace, port)
                try:  # once, to say why it cannot be, rather than closing each connection
                    self._forward(namespace, pod, pod_port).close()
                except Exception as e:
                    raise OpsError(f"cannot port-forward to pod {pod} in {namespace}: {first_line(e)}",
                                   "check that you may: kubectl auth can-i create pods/portforward "
                                   f"-n {namespace}") from None
                self._open[key] = self._listen(namespace, pod, pod_port)
            return self._open[key]

    def _backend(self, service: str, namespace: str, port: int) -> tuple[str, int]:
        """A ready pod behind the Service, and its port that the Service's `port` sends to."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        core = client.CoreV1Api(self._make_api())
        try:
            found = core.read_namespaced_service(service, namespace)
        except ApiException as e:
            if e.status != 404:
                raise OpsError(f"cannot read Service {service} in {namespace}: {e.reason}", "check the cluster") from None
            raise OpsError(f"there is no Service {service} in {namespace} to reach",
                           f"install it first: opsctl install --target kubernetes --only {service}") from None
        entry = next((p for p in found.spec.ports or [] if p.port == port), None)
        if entry is None or not found.spec.selector:
            raise OpsError(f"Service {service} in {namespace} sends nothing to pods on port {port}",
                           f"reinstall it: opsctl install --target kubernetes --only {service}")
        selector = ",".join(f"{k}={v}" for k, v in found.spec.selector.items())
        ready = [p for p in core.list_namespaced_pod(namespace, label_selector=selector).items
                 if p.status.phase == "Running" and p.metadata.deletion_timestamp is None
                 and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])]
        if not ready:
            raise OpsError(f"no pod behind Service {service} in {namespace} is ready",
                           f"see `opsctl status --target kubernetes` and the events of namespace {namespace}")
        pod, target = ready[0], entry.target_port or port
        if isinstance(target, str) and not target.isdigit():  # a named port of the pod's containers
            named = [p.container_port for c in pod.spec.containers for p in c.ports or [] if p.name == target]
            if not named:
                raise OpsError(f"pod {pod.metadata.name} has no port named {target}",
                               f"reinstall it: opsctl install --target kubernetes --only {service}")
            target = named[0]
        return pod.metadata.name, int(target)

    def _listen(self, namespace: str, pod: str, port: int) -> Address:
        listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, args=(listener, namespace, pod, port), daemon=True,
                         name=f"tunnel to {pod}:{port}").start()
        return Address("127.0.0.1", listener.getsockname()[1])

    def _accept(self, listener: socket.socket, namespace: str, pod: str, port: int) -> None:
        while True:
            local, _ = listener.accept()
            threading.Thread(target=self._carry, args=(local, namespace, pod, port), daemon=True).start()

    def _forward(self, namespace: str, pod: str, port: int):
        """A port-forward to the pod's port (the kubernetes client's PortForward)."""
        from kubernetes import client
        from kubernetes.stream import portforward

        # One client for every stream, one stream opened at a time: the kubernetes client
        # swaps a method of the client it opens a stream on, for the time it takes.
        with self._opening:
            if self._streams is None:
                self._streams = client.CoreV1Api(self._make_api())
            return portforward(self._streams.connect_get_namespaced_pod_portforward, pod, namespace, ports=str(port))

    def _carry(self, local: socket.socket, namespace: str, pod: str, port: int) -> None:
        """One connection: its own port-forward, bytes both ways until either side ends."""
        try:
            forward = self._forward(namespace, pod, port)
        except Exception:  # checked when the tunnel opened: the client sees its connection closed
            local.close()
            return
        remote = forward.socket(port)
        back = threading.Thread(target=_pump, args=(remote, local), daemon=True)
        back.start()
        _pump(local, remote)
        back.join(timeout=30)
        forward.close()
        local.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until `source` ends, then end `sink`'s writing so the other side sees the end."""
    try:
        while data := source.recv(CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass
