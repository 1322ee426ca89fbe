"""The helm chart rendered as helm renders it, and the objects checked.

tools/chart-render is `helm template` built from helm 3's own template libraries (Go's
text/template, sprig v3, sigs.k8s.io/yaml: Debian packages, installed by `make system-deps`),
so values reach the templates as helm gives them (a values file's numbers as float64). Each
values set the templates branch on is rendered; every document must parse with a YAML loader
that refuses duplicate keys (helm and the API server keep the last one silently), be a known
kind and apiVersion, and refer correctly to the others (selectors, port names, claims, config
maps); the container's environment must be accepted by larder's own config loader. No
Kubernetes schema validation: cheap structural checks only.
"""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from larder.service.config import Config, load_config, unknown_variables

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "larder"
BUILD = ROOT / "tools" / "build-chart-render.sh"
RENDERER = ROOT / "build" / "chart-render" / "chart-render"

API_VERSIONS = {
    "ConfigMap": "v1",
    "Service": "v1",
    "PersistentVolumeClaim": "v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "Ingress": "networking.k8s.io/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
}
INGRESS_DEFAULTS = {
    "nginx.ingress.kubernetes.io/proxy-body-size": "0",
    "nginx.ingress.kubernetes.io/proxy-request-buffering": "off",
    "nginx.ingress.kubernetes.io/proxy-read-timeout": "600",
    "nginx.ingress.kubernetes.io/proxy-send-timeout": "600",
}
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
DURATION = re.compile(r"([0-9]+(ms|s|m|h))+")


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with a key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def test_the_loader_refuses_duplicate_keys() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        yaml.load("m:\n  a: 1\n  b: 2\n  a: 3\n", Loader=UniqueKeyLoader)


@pytest.fixture(scope="module")
def renderer() -> Path:
    """The renderer, built when missing or older than its source (quick when it is current)."""
    built = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=600)
    if built.returncode != 0:
        pytest.fail(
            f"cannot build the chart renderer ({BUILD.name}); `make system-deps` installs Go and"
            f" helm's template libraries (golang-go, golang-github-masterminds-sprig-dev,"
            f" golang-k8s-sigs-yaml-dev):\n{built.stdout}{built.stderr}",
            pytrace=False,
        )
    return RENDERER


@dataclass
class Rendered:
    text: str
    docs: list[dict[str, Any]]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        (doc,) = self.of(kind)
        return doc

    @property
    def kinds(self) -> Counter[str]:
        return Counter(d["kind"] for d in self.docs)


def run(renderer: Path, tmp_path: Path, values: str, sets: tuple[str, ...]) -> Any:
    args = [str(renderer), str(CHART)]
    if values:
        file = tmp_path / "values.yaml"
        file.write_text(values)
        args += ["-f", str(file)]
    for assignment in sets:
        args += ["--set", assignment]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def render(renderer: Path, tmp_path: Path, values: str = "", *sets: str) -> Rendered:
    """``helm template`` with a values file (YAML text) and --set assignments, checked."""
    done = run(renderer, tmp_path, values, sets)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
    docs = []
    for chunk in re.split(r"(?m)^---\n", done.stdout):
        if chunk.strip():
            source = chunk.split("\n", 1)[0]
            try:
                doc = yaml.load(chunk, Loader=UniqueKeyLoader)
            except yaml.YAMLError as exc:
                raise AssertionError(f"{source}: not valid YAML: {exc}") from None
            assert isinstance(doc, dict), f"{source}: not a mapping"
            docs.append(doc)
    rendered = Rendered(done.stdout, docs)
    check_objects(rendered)
    return rendered


def check_objects(rendered: Rendered) -> None:
    """Kinds and apiVersions, names, and what the objects say of each other."""
    for doc in rendered.docs:
        kind = doc.get("kind")
        assert kind in API_VERSIONS and doc.get("apiVersion") == API_VERSIONS[kind], doc
        meta = doc["metadata"]
        assert DNS_LABEL.fullmatch(meta["name"]), meta["name"]
        for field in ("labels", "annotations"):
            for key, value in (meta.get(field) or {}).items():
                assert isinstance(value, str), f"{kind} {field} {key}: {value!r} is no string"
    for configmap in rendered.of("ConfigMap"):
        for key, value in configmap["data"].items():
            assert isinstance(value, str), f"ConfigMap data {key}: {value!r} is no string"

    deployment = rendered.one("Deployment")
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]

    def selects_pods(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= pod_labels.items()

    assert selects_pods(deployment["spec"]["selector"]["matchLabels"])
    (container,) = pod["spec"]["containers"]
    container_ports = {p["name"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in container_ports
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes.keys()
    env_names = [e["name"] for e in container.get("env", [])]
    assert len(env_names) == len(set(env_names)), env_names
    configmaps = {c["metadata"]["name"] for c in rendered.of("ConfigMap")}
    refs = [s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s]
    assert refs and set(refs) <= configmaps

    service = rendered.one("Service")
    assert selects_pods(service["spec"]["selector"])
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in container_ports
    for pdb in rendered.of("PodDisruptionBudget"):
        assert selects_pods(pdb["spec"]["selector"]["matchLabels"])
    for ingress in rendered.of("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"]["name"] in service_ports
    for monitor in rendered.of("ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector and selector.items() <= service["metadata"]["labels"].items()
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in service_ports
            assert DURATION.fullmatch(endpoint["interval"]), endpoint
    claims = {c["metadata"]["name"] for c in rendered.of("PersistentVolumeClaim")}
    if claims:
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] in claims


def container_env(rendered: Rendered) -> dict[str, str]:
    """The larder container's environment: its config maps, then its env entries (which win);
    a valueFrom entry (a Secret's value) must at least name a setting."""
    (container,) = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"]
    configmaps = {c["metadata"]["name"]: c["data"] for c in rendered.of("ConfigMap")}
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            assert not unknown_variables({entry["name"]: "secret"}), entry
        else:
            env[entry["name"]] = entry["value"]
    return env


def config_of(rendered: Rendered) -> Config:
    """What larder makes of the container's environment (as `larder serve` would)."""
    env = container_env(rendered)
    assert unknown_variables(env) == []
    return load_config({}, environ=env)


def test_defaults(renderer: Path, tmp_path: Path) -> None:
    rendered = render(renderer, tmp_path)
    assert rendered.kinds == Counter(
        {"ConfigMap": 2, "Deployment": 1, "PersistentVolumeClaim": 1, "Service": 1}
    )
    config = config_of(rendered)
    assert (config.listen, config.storage) == ("0.0.0.0:8080", "/var/lib/larder")
    assert config.max_upload_size == 16 * 1024**3 and config.max_connections == 1000
    deployment = rendered.one("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


INGRESS_FILE = """\
ingress:
  enabled: true
  className: nginx
  host: cache.example.com
  tls: [{secretName: larder-tls, hosts: [cache.example.com]}]
  annotations:
    nginx.ingress.kubernetes.io/proxy-body-size: 512m
    cert-manager.io/cluster-issuer: letsencrypt
"""
INGRESS_SETS = (
    "ingress.enabled=true",
    r"ingress.annotations.nginx\.ingress\.kubernetes\.io/proxy-body-size=512m",
    r"ingress.annotations.cert-manager\.io/cluster-issuer=letsencrypt",
)


@pytest.mark.parametrize(
    ("values", "sets"), [(INGRESS_FILE, ()), ("", INGRESS_SETS)], ids=["values-file", "set"]
)
def test_ingress_annotations_override_the_defaults_once(
    renderer: Path, tmp_path: Path, values: str, sets: tuple[str, ...]
) -> None:
    rendered = render(renderer, tmp_path, values, *sets)
    ingress = rendered.one("Ingress")
    assert ingress["metadata"]["annotations"] == {
        **INGRESS_DEFAULTS,
        "nginx.ingress.kubernetes.io/proxy-body-size": "512m",  # the user's value wins
        "cert-manager.io/cluster-issuer": "letsencrypt",
    }
    assert rendered.text.count("nginx.ingress.kubernetes.io/proxy-body-size:") == 1
    if values:
        assert ingress["spec"]["ingressClassName"] == "nginx"
        assert ingress["spec"]["rules"][0]["host"] == "cache.example.com"
        assert ingress["spec"]["tls"] == [
            {"secretName": "larder-tls", "hosts": ["cache.example.com"]}
        ]


def test_ingress_without_annotations_has_the_defaults(renderer: Path, tmp_path: Path) -> None:
    rendered = render(renderer, tmp_path, "", "ingress.enabled=true")
    assert rendered.one("Ingress")["metadata"]["annotations"] == INGRESS_DEFAULTS


def test_s3_with_replicas_has_a_disruption_budget_and_no_volume(
    renderer: Path, tmp_path: Path
) -> None:
    values = """\
replicaCount: 3
storage:
  mode: s3
  s3: {bucket: team-cache, prefix: larder, endpointUrl: "https://minio.example.com",
       region: eu-west-1, existingSecret: larder-s3}
"""
    rendered = render(renderer, tmp_path, values)
    assert rendered.kinds == Counter(
        {"ConfigMap": 2, "Deployment": 1, "PodDisruptionBudget": 1, "Service": 1}
    )
    assert rendered.one("PodDisruptionBudget")["spec"]["minAvailable"] == 1
    deployment = rendered.one("Deployment")
    assert deployment["spec"]["replicas"] == 3 and "strategy" not in deployment["spec"]
    pod = deployment["spec"]["template"]["spec"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert {"secretRef": {"name": "larder-s3"}} in pod["containers"][0]["envFrom"]
    env = container_env(rendered)
    assert env["AWS_ENDPOINT_URL"] == "https://minio.example.com"
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert config_of(rendered).storage == "s3://team-cache/larder"


def test_an_existing_claim_is_mounted_and_none_made(renderer: Path, tmp_path: Path) -> None:
    rendered = render(renderer, tmp_path, "storage: {disk: {existingClaim: my-claim}}\n")
    assert "PersistentVolumeClaim" not in rendered.kinds
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    (data,) = [v for v in pod["volumes"] if v["name"] == "data"]
    assert data["persistentVolumeClaim"] == {"claimName": "my-claim"}
    assert config_of(rendered).storage == "/var/lib/larder"


def test_secrets_are_mounted_where_the_config_says(renderer: Path, tmp_path: Path) -> None:
    values = """\
tokenSecret: {existingSecret: larder-token}
signingKeys: {existingSecret: larder-keys}
extraEnv:
  - {name: LARDER_STORAGE_TIMEOUT, value: "30"}
  - {name: LARDER_MAX_NAR_SIZE, value: 128GiB}
  - {name: LARDER_WORKERS, value: "2"}
  - name: LARDER_PUBLIC_URL
    valueFrom: {secretKeyRef: {name: other, key: url}}
"""
    rendered = render(renderer, tmp_path, values)
    pod = rendered.one("Deployment")["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert secrets == {"token": "larder-token", "keys": "larder-keys"}
    assert mounts["token"]["readOnly"] and mounts["keys"]["readOnly"]
    config = config_of(rendered)
    assert Path(config.token_secret_file).parent == Path(mounts["token"]["mountPath"])
    assert config.signing_keys_dir == mounts["keys"]["mountPath"]
    assert config.storage_timeout == 30 and config.max_nar_size == 128 * 1024**3
    assert config.workers == 2  # extraEnv wins over the chart's LARDER_WORKERS


def test_service_monitor_scrapes_the_service(renderer: Path, tmp_path: Path) -> None:
    values = "serviceMonitor: {enabled: true, interval: 15s, labels: {release: prometheus}}\n"
    rendered = render(renderer, tmp_path, values)
    monitor = rendered.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]


def test_big_numbers_in_a_values_file_reach_larder_whole(renderer: Path, tmp_path: Path) -> None:
    """helm reads a values file's numbers as float64, which print as 1e+06 unless the
    chart takes care."""
    values = """\
config:
  maxConnections: 1000000
  maxUploadSize: 17179869184
  usageInterval: 1000000
  refreshInterval: 0.5
  gc: {interval: 2592000}
"""
    rendered = render(renderer, tmp_path, values)
    env = container_env(rendered)
    assert env["LARDER_MAX_CONNECTIONS"] == "1000000"
    assert env["LARDER_MAX_UPLOAD_SIZE"] == "17179869184"
    assert env["LARDER_GC_INTERVAL"] == "2592000"
    config = config_of(rendered)
    assert (config.max_connections, config.max_upload_size) == (1000000, 17179869184)
    assert (config.usage_interval, config.refresh_interval) == (1000000, 0.5)


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("storage.mode=s3",), "storage.s3.bucket is required in s3 mode"),
        (("storage.mode=nfs",), "storage.mode must be disk or s3"),
        (("replicaCount=2",), "disk storage serves one volume: use replicaCount 1"),
    ],
    ids=["s3-without-bucket", "unknown-mode", "disk-with-2-replicas"],
)
def test_bad_values_fail_to_render(
    renderer: Path, tmp_path: Path, sets: tuple[str, ...], message: str
) -> None:
    done = run(renderer, tmp_path, "", sets)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("Error: ") and message in done.stderr, done.stderr
