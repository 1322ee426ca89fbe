"""Static checks of the helm chart and the Dockerfile (no cluster, no image build); the chart
rendered and its objects checked: test_chart_render.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from larder.service.config import DEFAULTS_ENV, load_config
from larder.service.healthcheck import listen_address
from tools.make_dashboard import OUT as DASHBOARD_CHECKED_BY_THE_METRICS_TESTS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "larder"
VALUE_PATH = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def values() -> dict[str, Any]:
    return dict(yaml.safe_load((CHART / "values.yaml").read_text()))


def test_chart_and_values_parse() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "larder"
    assert chart["version"] and chart["appVersion"]
    assert values()["storage"]["mode"] == "disk"


def test_every_values_path_in_templates_exists() -> None:
    tree = values()
    used = set()
    for template in (CHART / "templates").iterdir():
        used.update(VALUE_PATH.findall(template.read_text()))
    assert len(used) > 20
    for path in sorted(used):
        node: Any = tree
        for part in path.strip(".").split("."):
            assert isinstance(node, dict) and part in node, f".Values{path} is not in values.yaml"
            node = node[part]


def test_every_value_is_used_by_a_template() -> None:
    text = "".join(t.read_text() for t in (CHART / "templates").iterdir())

    def leaves(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict) and node:
            return [p for key, child in node.items() for p in leaves(child, f"{prefix}.{key}")]
        return [prefix]

    for leaf in leaves(values(), ".Values"):
        parents = [leaf.rsplit(".", n)[0] for n in range(leaf.count(".") - 1)]
        assert any(p in text for p in [leaf, *parents]), f"{leaf} is never used"


def test_dashboard_in_the_chart_is_the_checked_one() -> None:
    assert DASHBOARD_CHECKED_BY_THE_METRICS_TESTS == CHART / "dashboards" / "larder.json"
    configmap = (CHART / "templates" / "dashboard-configmap.yaml").read_text()
    assert '.Files.Get "dashboards/larder.json"' in configmap
    assert "grafana_dashboard" in values()["dashboard"]["labels"]


def test_disk_mode_refuses_several_replicas_and_pods_run_locked_down() -> None:
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    assert re.search(
        r'if and \(eq \.Values\.storage\.mode "disk"\) \(gt \(int \.Values\.replicaCount\) 1\)',
        deployment,
    )
    assert "{{- fail" in deployment
    for needle in ("runAsNonRoot: true", "readOnlyRootFilesystem: true", "path: /healthz",
                   "path: /readyz", "allowPrivilegeEscalation: false"):  # fmt: skip
        assert needle in deployment, needle


def test_settings_the_values_lack_can_be_set_through_extra_env() -> None:
    """storage_timeout, max_nar_size...: the container takes any env entries given."""
    assert values()["extraEnv"] == []
    deployment = (CHART / "templates" / "deployment.yaml").read_text()
    container = deployment.split("- name: larder\n", 1)[1].split("securityContext:", 1)[0]
    assert re.search(
        r"\{\{- with \.Values\.extraEnv \}\}\n {10}env: \{\{- toYaml \. \| nindent 12 \}\}\n"
        r" {10}\{\{- end \}\}",
        container,
    )
    documented = (ROOT / "docs" / "operating.md").read_text()
    assert "`extraEnv`" in documented and "LARDER_STORAGE_TIMEOUT" in documented


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) == 2
    final = dockerfile.split("\nFROM ")[-1]
    assert "slim" in final.splitlines()[0]
    assert re.search(r"^USER 10001", final, re.M)
    assert "HEALTHCHECK" in final
    # The probe reads LARDER_LISTEN (and the config file) as the server does: never a fixed port.
    probe = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (.*)$", final, re.M)
    assert probe is not None and probe[1] == '["python", "-m", "larder.service.healthcheck"]'
    assert "8080/healthz" not in final
    assert 'ENTRYPOINT ["larder", "serve"]' in final
    assert 'VOLUME ["/var/lib/larder"]' in final
    assert not re.search(r"apt-get install|gcc|build-essential", final)


def test_a_mounted_config_file_overrides_the_image_defaults(tmp_path: Path) -> None:
    """The image's listen and storage are defaults below a config file, not LARDER_* variables
    that would silently win over it; the health check reads listen in the same order."""
    final = (ROOT / "Dockerfile").read_text().split("\nFROM ")[-1].replace("\\\n", " ")
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(re.findall(r"^ENV (.*)$", final, re.M))))
    assert [name for name in env if name.startswith("LARDER_")] == [DEFAULTS_ENV]
    copied = re.search(rf"^COPY (\S+) {re.escape(env[DEFAULTS_ENV])}$", final, re.M)
    assert copied is not None
    image = {DEFAULTS_ENV: str(ROOT / copied[1])}  # the image's environment, here
    assert load_config({}, environ=image).listen == "0.0.0.0:8080"
    assert load_config({}, environ=image).storage == "/var/lib/larder"
    assert listen_address(image) == "0.0.0.0:8080"
    mounted = tmp_path / "larder.toml"
    mounted.write_text('listen = "0.0.0.0:9000"\nstorage = "s3://team-cache/larder"\n')
    image["LARDER_CONFIG"] = str(mounted)
    config = load_config({}, environ=image)
    assert (config.listen, config.storage) == ("0.0.0.0:9000", "s3://team-cache/larder")
    assert listen_address(image) == "0.0.0.0:9000"
    image["LARDER_LISTEN"] = "0.0.0.0:9100"  # a variable still beats the file
    assert load_config({}, environ=image).listen == listen_address(image) == "0.0.0.0:9100"


def test_the_image_installs_the_tested_versions() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "constraints.txt" in dockerfile.split("\nRUN ")[0]
    assert re.search(r"pip install [^\n]*-c constraints\.txt \.", dockerfile)
