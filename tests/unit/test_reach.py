"""Two views of where a server is on the kubernetes target: the name the platform's services
use (its Service's cluster DNS name) and the way opsctl gets in to configure it (a local
port-forward). The tunnels are faked here; tests/integration/kubernetes/test_configuration.py
uses real ones."""

import pytest

from opsctl import spec
from opsctl.components import build, keycloak_realm, vault
from opsctl.context import Context
from opsctl.net import Address


class FakeTunnels:
    def __init__(self):
        self.opened = []

    def reach(self, service: str, namespace: str, port: int) -> Address:
        self.opened.append((service, namespace, port))
        return Address("127.0.0.1", 40000 + len(self.opened))


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPSCTL_CONFIG", raising=False)
    ctx = Context(spec.load(None), "kubernetes", tmp_path / ".opsctl")
    ctx.runtime.tunnels = FakeTunnels()
    return ctx


def test_opsctl_gets_in_through_a_port_forward_the_services_by_the_cluster_name(cluster):
    namespace = cluster.spec.kubernetes.namespace("vault")
    port = cluster.spec.components["vault"].ports["http"]
    assert vault.address(cluster) == f"http://vault.{namespace}.svc.cluster.local:{port}"
    assert vault.reached(cluster) == "http://127.0.0.1:40001"
    assert cluster.runtime.tunnels.opened == [("vault", namespace, port)]
    assert keycloak_realm.issuer(cluster).startswith("http://keycloak.")  # what Vault and the services trust


def test_hints_name_the_target_they_are_for(cluster):
    assert cluster.opsctl("vault unseal") == "opsctl vault unseal --target kubernetes"


def test_what_has_no_service_on_the_cluster_cannot_be_reached(cluster):
    from opsctl.errors import UsageError

    with pytest.raises(UsageError, match="cannot reach mesh"):
        cluster.reach("mesh", "blue/upstream/stock-service")


class FakeMongo:
    """What a mongod started with --replSet answers before anyone initiates the set."""

    def __init__(self):
        self.initiated = None
        self.admin = self

    def command(self, name, *args):
        from pymongo.errors import OperationFailure

        if name == "replSetGetStatus":
            if self.initiated is None:
                raise OperationFailure("no replset config has been received", code=94)
            return {"set": self.initiated["_id"]}
        if name == "replSetInitiate":
            self.initiated = args[0]
            return {"ok": 1}
        assert name == "hello"
        return {"isWritablePrimary": self.initiated is not None}


def test_a_new_replica_set_is_initiated_once_with_the_name_the_services_reach_it_by(cluster):
    mongodb, fake = build("mongodb", cluster), FakeMongo()
    assert mongodb._initiate(fake) is True
    names, port = cluster.spec.names.mongodb, cluster.spec.components["mongodb"].ports["mongo"]
    host = f"mongodb.{cluster.spec.kubernetes.namespace('mongodb')}.svc.cluster.local:{port}"
    assert fake.initiated == {"_id": names.replica_set, "members": [{"_id": 0, "host": host}]}
    assert mongodb._initiate(fake) is False
