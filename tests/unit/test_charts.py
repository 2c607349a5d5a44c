"""The add-ons' upstream charts as the kubernetes target assembles them from a Go module's
zip (the download itself is the integration tests')."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import yaml

from opsctl.errors import OpsError
from opsctl.spec import UpstreamChart
from opsctl.targets.kubernetes import charts

ROOT = "example.org/Charts@v1.2.3/"


def module(files: dict[str, str]) -> zipfile.ZipFile:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(ROOT + name, text)
    return zipfile.ZipFile(io.BytesIO(buffer.getvalue()))


def chart(**extra) -> UpstreamChart:
    return UpstreamChart(name="example/thing", version="v1.2.3", repository="https://charts.example.org",
                         module="example.org/Charts", path="deploy/chart", **extra)


def test_a_chart_template_gets_its_version_and_its_crds(tmp_path):
    archive = module({"deploy/chart/Chart.template.yaml": "apiVersion: v2\nname: thing\nversion: v0.0.0\n",
                      "deploy/chart/templates/deployment.yaml": "kind: Deployment\n",
                      "deploy/crds/crd-things.yaml": "kind: CustomResourceDefinition\n",
                      "deploy/crds/README.md": "not a template\n",
                      "elsewhere/ignored.yaml": "x: 1\n"})
    charts._assemble(chart(crds="deploy/crds"), archive, ROOT, tmp_path)
    meta = yaml.safe_load((tmp_path / "Chart.yaml").read_text())
    assert (meta["version"], meta["appVersion"]) == ("v1.2.3", "v1.2.3")
    assert sorted(p.name for p in (tmp_path / "templates").iterdir()) == ["crd-things.yaml", "deployment.yaml"]
    assert not (tmp_path / "Chart.template.yaml").exists() and not (tmp_path / "ignored.yaml").exists()


@pytest.mark.parametrize("files,says", [
    ({"deploy/chart/Chart.yaml": "name: thing\nversion: 1.2.3\ndependencies: [{name: grafana, repository: "
      "https://grafana.example.org}]\n"}, "dependencies grafana are not vendored"),
    ({"deploy/chart/Chart.yaml": "name: thing\nversion: 9.9.9\n"}, "holds version 9.9.9"),
    ({"deploy/other/Chart.yaml": "name: thing\n"}, "has no folder deploy/chart"),
])
def test_a_chart_that_cannot_be_assembled_says_why(tmp_path, files, says):
    with pytest.raises(OpsError) as raised:
        charts._assemble(chart(), module(files), ROOT, tmp_path)
    assert says in raised.value.message and "cannot be fetched" in raised.value.message
    assert "helm pull thing --repo https://charts.example.org --version v1.2.3" in raised.value.hint
    assert "charts/example-thing-v1.2.3" in raised.value.hint


def test_a_chart_is_pulled_from_its_repository_first_and_kept(tmp_path):
    import subprocess

    calls = []

    def helm(*args, timeout):
        calls.append(args)
        into = Path(args[args.index("--untardir") + 1]) / "airflow"
        into.mkdir()
        (into / "Chart.yaml").write_text("name: airflow\nversion: 1.18.0\n")
        return subprocess.CompletedProcess(args, 0, "", "")

    bare = UpstreamChart(name="apache-airflow/airflow", version="1.18.0", repository="https://airflow.apache.org")
    home = charts.fetch(bare, tmp_path, helm)
    assert calls[0][:5] == ("pull", "airflow", "--repo", "https://airflow.apache.org", "--version")
    assert (home / "Chart.yaml").is_file() and home.name == "apache-airflow-airflow-1.18.0"
    assert charts.fetch(bare, tmp_path, helm) == home and len(calls) == 1  # from the cache
    assert [p.name for p in (tmp_path / "charts").iterdir()] == [home.name]  # no scratch left


def test_a_chart_its_repository_does_not_give_and_no_module_holds_is_not_fetched(tmp_path):
    import subprocess

    def unreachable(*args, timeout):
        return subprocess.CompletedProcess(args, 1, "", "Error: looks like it cannot be reached: no such host")

    bare = UpstreamChart(name="apache-airflow/airflow", version="1.18.0", repository="https://airflow.apache.org")
    with pytest.raises(OpsError, match="does not answer .*no such host.*on no registry this machine reaches"):
        charts.fetch(bare, tmp_path, unreachable)
    assert list((tmp_path / "charts").iterdir()) == []


def test_the_proxy_and_the_module_path_follow_the_go_toolchain(monkeypatch):
    monkeypatch.setenv("GOPROXY", "direct")
    assert charts.proxy() == charts.DEFAULT_PROXY
    monkeypatch.setenv("GOPROXY", "https://goproxy.example.org/,https://proxy.golang.org,direct")
    assert charts.proxy() == "https://goproxy.example.org"
    assert charts._escaped("github.com/Azure/Thing") == "github.com/!azure/!thing"
