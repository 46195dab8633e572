"""deploy/: what an operator applies is what the server accepts.

The Kubernetes objects pass the API's schemas (kubernetes-validate, strict: an unknown field fails), the
ServiceMonitor the prometheus-operator's own model of its CRD, the systemd unit `systemd-analyze verify`;
the pieces name each other correctly (ports, Secret keys, mount paths, probe paths), their memory and disk
sizes cover membrain.toml's capacities, and that one membrain.toml starts a real server.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from configparser import ConfigParser

import httpx
import kubernetes_validate
import pytest
import yaml

from membrain_async.config import parse_size
from membrain_async.server.disk import segment_bytes_for
from membrain_async.server.embed import server_command
from membrain_async.server.store import bookkeeping_per_value

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(DEPLOY, "kubernetes")
TOML_PATH = os.path.join(DEPLOY, "membrain.toml")
UNIT_PATH = os.path.join(DEPLOY, "systemd", "membrain.service")
# The oldest Kubernetes release still supported upstream, and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.32.0", kubernetes_validate.latest_version()]


def _objects() -> list[dict]:
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        resources = yaml.safe_load(f)["resources"]
    docs = []
    for name in resources:
        with open(os.path.join(K8S, name)) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    return docs


OBJECTS = _objects()


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for d in OBJECTS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def _settings() -> dict:
    return tomllib.loads(_one("ConfigMap")["data"]["membrain.toml"])


def _container() -> dict:
    (container,) = _one("StatefulSet")["spec"]["template"]["spec"]["containers"]
    return container


def _quantity(text: str) -> int:
    """A Kubernetes memory or storage quantity in bytes (the suffixes these manifests may use)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(text))
    assert m, f"not a quantity: {text!r}"
    unit = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
            "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(m.group(1)) * unit


def _memory_needed(settings: dict) -> int:
    """RSS at capacity: the store's bound (tests/unit/test_server_process.py: 10% over capacity plus 64 MiB) and
    the bookkeeping of a store full of 64 KiB values (KV blocks are larger; smaller ones would need more)."""
    capacity = parse_size(settings["capacity"])
    per_value = bookkeeping_per_value(settings.get("eviction", "adaptive"))
    return int(capacity * 1.10) + (64 << 20) + capacity // (64 << 10) * per_value


def test_the_kustomization_lists_every_manifest():
    manifests = {n for n in os.listdir(K8S) if n.endswith(".yaml")} - {"kustomization.yaml"}
    with open(os.path.join(K8S, "kustomization.yaml")) as f:
        assert set(yaml.safe_load(f)["resources"]) == manifests
    kinds = sorted(d["kind"] for d in OBJECTS)
    assert kinds == ["ConfigMap", "Secret", "Service", "Service", "ServiceMonitor", "StatefulSet"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_pass_the_kubernetes_schemas_strictly(version):
    for doc in OBJECTS:
        if doc["apiVersion"] != "monitoring.coreos.com/v1":
            kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_fails_the_schema_check():
    # The check above can fail: strict mode refuses a field the API does not have.
    broken = json.loads(json.dumps(_one("StatefulSet")))
    broken["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_the_service_monitor_matches_the_prometheus_operator_model():
    # cloudcoil's models are generated from the prometheus-operator's CRDs. They validate types and drop
    # what they do not know, so a round trip that loses nothing means every field is one the CRD has.
    from cloudcoil.models.prometheus_operator.v1 import ServiceMonitor

    doc = _one("ServiceMonitor")
    assert ServiceMonitor.model_validate(doc).model_dump(by_alias=True, exclude_unset=True, mode="json") == doc
    misspelt = json.loads(json.dumps(doc))
    misspelt["spec"]["endpoints"][0]["bearerTokenSecrett"] = {"name": "x", "key": "y"}
    assert ServiceMonitor.model_validate(misspelt).model_dump(by_alias=True, exclude_unset=True, mode="json") != misspelt


def test_the_objects_name_each_other():
    sts, secret, container = _one("StatefulSet"), _one("Secret"), _container()
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port == {"membrain": _settings()["port"]}

    headless = _one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    for svc in (d for d in OBJECTS if d["kind"] == "Service"):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= port.keys()

    monitor = _one("ServiceMonitor")["spec"]
    scraped = [s for s in OBJECTS if s["kind"] == "Service"
               and monitor["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert scraped == [headless]  # one Service: each pod scraped once
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in {p["name"] for p in headless["spec"]["ports"]} and endpoint["path"] == "/metrics"
    credentials = endpoint["authorization"]["credentials"]
    assert credentials["name"] == secret["metadata"]["name"] and credentials["key"] in secret["stringData"]

    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {p["port"] for p in probes.values()} <= port.keys()
    assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"


def test_the_mounts_hold_the_files_membrain_toml_names():
    sts, container, settings = _one("StatefulSet"), _container(), _settings()
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}

    config_flag = container["command"][container["command"].index("--config") + 1]
    assert volumes["config"]["configMap"]["name"] == _one("ConfigMap")["metadata"]["name"]
    assert config_flag == os.path.join(mounts["config"], "membrain.toml")

    auth = volumes["auth"]["secret"]
    assert auth["secretName"] == _one("Secret")["metadata"]["name"]
    (item,) = auth["items"]
    assert settings["auth-file"] == os.path.join(mounts["auth"], item["path"]) and item["key"] == "auth.json"
    assert not any("subPath" in m for m in container["volumeMounts"])  # a subPath mount never sees a rotation

    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert settings["disk-path"].startswith(mounts[claim["metadata"]["name"]] + "/")


def test_memory_and_disk_cover_the_capacities():
    settings, container, sts = _settings(), _container(), _one("StatefulSet")
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests["memory"] == limits["memory"]  # Guaranteed QoS: the last pod the kubelet evicts
    assert _quantity(limits["memory"]) >= _memory_needed(settings)

    disk = parse_size(settings["disk-capacity"])
    storage = _quantity(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])
    assert storage >= disk * 1.05 + 2 * segment_bytes_for(disk)  # reclaiming segments, filesystem overhead
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > settings["disk-flush-seconds"]


def test_the_config_map_carries_deploy_membrain_toml():
    with open(TOML_PATH) as f:
        assert _one("ConfigMap")["data"]["membrain.toml"] == f.read()


def _local_copy(tmp_path) -> str:
    """membrain.toml with its files moved under tmp_path: the Secret's auth.json and a disk-tier directory."""
    auth = tmp_path / "auth.json"
    auth.write_text(_one("Secret")["stringData"]["auth.json"])
    text = _one("ConfigMap")["data"]["membrain.toml"]
    settings = _settings()
    text = text.replace(f'"{settings["auth-file"]}"', json.dumps(str(auth)))
    text = text.replace(f'"{settings["disk-path"]}"', json.dumps(str(tmp_path / "disk")))
    assert tomllib.loads(text).keys() == settings.keys()
    path = tmp_path / "membrain.toml"
    path.write_text(text)
    return str(path)


def test_membrain_serve_accepts_the_shipped_config(tmp_path):
    path = _local_copy(tmp_path)
    r = subprocess.run([sys.executable, "-m", "membrain_async.cli", "serve", "--config", path, "--check-config"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == f"membrain serve: configuration OK ({path})\n"


def test_the_shipped_config_and_secret_start_a_real_server(tmp_path):
    # Everything from the file but the address (loopback, a free port) and the disk tier's size (the file's
    # 100GiB is refused where the disk has less free), by flags over it.
    path = _local_copy(tmp_path)
    proc = subprocess.Popen([*server_command({"host": "127.0.0.1", "port": 0, "disk_capacity": "1GiB"}),
                             "--config", path],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        url = json.loads(proc.stdout.readline())["url"]
        tokens = json.loads(_one("Secret")["stringData"]["auth.json"])["tokens"]
        writer = next(t["token"] for t in tokens if t["scope"] == "readwrite")
        metrics = _one("Secret")["stringData"]["metrics-token"]
        assert httpx.get(f"{url}/healthz").status_code == 200  # the liveness probe needs no token
        info = httpx.get(f"{url}/v1/info").json()
        assert info["auth"] and info["limits"]["capacity"] == parse_size(_settings()["capacity"])
        assert "disk" in info["capabilities"]
        block = os.urandom(64 << 10)
        assert httpx.put(f"{url}/memory/default/k", content=block).status_code == 401
        assert httpx.put(f"{url}/memory/default/k", content=block,
                         headers={"authorization": f"Bearer {writer}"}).status_code == 201
        assert httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {metrics}"}).status_code == 200
        assert httpx.get(f"{url}/metrics", headers={"authorization": f"Bearer {writer}"}).status_code == 403
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        proc.stdout.close()


def _unit() -> ConfigParser:
    unit = ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(UNIT_PATH)
    return unit


def test_the_systemd_unit_runs_serve_with_the_config_and_reloads_with_sighup():
    service, settings = _unit()["Service"], tomllib.loads(open(TOML_PATH).read())
    assert service["ExecStart"].endswith("/membrain serve --config /etc/membrain/membrain.toml")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["disk-path"].startswith(f"/var/lib/{service['StateDirectory']}/")
    assert settings["auth-file"].startswith(f"/etc/{service['ConfigurationDirectory']}/")
    assert parse_size(service["MemoryMax"].replace("G", "GiB")) >= _memory_needed(settings)
    assert int(service["LimitNOFILE"]) > settings.get("max-connections", 512)
    assert int(service["TimeoutStopSec"]) > settings["disk-flush-seconds"]
    assert service["RestartPreventExitStatus"] == "2"  # a configuration mistake: restarting would not mend it


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path):
    # verify insists that ExecStart's program exists: point it at this environment's membrain.
    text = open(UNIT_PATH).read()
    start = _unit()["Service"]["ExecStart"].split()[0]
    unit = tmp_path / "membrain.service"
    unit.write_text(text.replace(start, f"{sys.executable} -m membrain_async.cli"))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    unit.write_text(text.replace(start, f"{sys.executable} -m membrain_async.cli").replace("ProtectHome=", "ProtectHom="))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in r.stderr  # the check above can fail
