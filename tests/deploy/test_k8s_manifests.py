"""The Kubernetes manifests in k8s/, rendered offline and checked.

Every kustomization that can be deployed (the base and each overlay) is rendered with
``kubectl kustomize`` (offline; no cluster), every document is validated against the Kubernetes
1.31 schemas with kubernetes-validate in strict mode (unknown fields fail), and then the PipeSpec
invariants are checked: a Deployment, a headless Service, a PodDisruptionBudget and an autoscaler
per level; one stage Deployment per level the gateway expects; probes, resources, pinned images and
non-root security everywhere; GPUs where a level runs on CUDA; ConfigMap keys that the services
actually read, and settings that load.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import security
from common.settings import GatewaySettings, StageSettings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
K8S_VERSION = "1.31.0"  # the oldest Kubernetes the manifests must be valid for
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["base", *(f"overlays/{name}" for name in OVERLAYS)]
GPU_RESOURCE = "nvidia.com/gpu"
PREFIXES = {"PIPESPEC_GATEWAY_": GatewaySettings, "PIPESPEC_STAGE_": StageSettings}
POD_IP = "10.0.0.7"  # stands in for status.podIP when settings are built from a rendered pod
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not on PATH: `kubectl kustomize` renders k8s/ (offline)"
)

Doc = dict[str, Any]


# -- rendering and lookups ---------------------------------------------------------------------


@functools.cache
def render(target: str) -> tuple[Doc, ...]:
    proc = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"kubectl kustomize k8s/{target} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


@pytest.fixture(params=TARGETS)
def target(request) -> str:
    return request.param


@pytest.fixture
def docs(target: str) -> tuple[Doc, ...]:
    return render(target)


def of_kind(docs, kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def name(doc: Doc) -> str:
    return doc["metadata"]["name"]


def component(doc: Doc) -> str | None:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def stage_deployments(docs) -> list[Doc]:
    return [d for d in of_kind(docs, "Deployment") if component(d) == "stage"]


def gateway_deployment(docs) -> Doc:
    (gateway,) = [d for d in of_kind(docs, "Deployment") if component(d) == "gateway"]
    return gateway


def pod_specs(docs) -> Iterator[tuple[str, Doc]]:
    """(owner, pod spec) of every workload."""
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{d['kind']}/{name(d)}", d["spec"]["template"]["spec"]


def containers(pod: Doc, init: bool = True) -> list[Doc]:
    return pod["containers"] + (pod.get("initContainers", []) if init else [])


def pod_labels(workload: Doc) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def level_of(deployment: Doc) -> int:
    return int(pod_labels(deployment)["pipespec/level"])


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) or a Service's plain selector."""
    if selector is None:
        return False
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def env_of(container: Doc, docs) -> dict[str, str]:
    """The container's environment as the process would see it (ConfigMaps, then `env`)."""
    config_maps = {name(c): c.get("data", {}) for c in of_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in config_maps, f"container {container['name']} reads missing ConfigMap {ref}"
        env.update(config_maps[ref])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = POD_IP if field == "status.podIP" else f"<{field}>"
    return env


def settings_of(cls, env: dict[str, str], monkeypatch) -> Any:
    """Build a settings object from exactly ``env`` (nothing from this test process)."""
    prefix = cls.model_config["env_prefix"]
    for key in [k for k in os.environ if k.startswith(prefix)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return cls()


def port(container: Doc, port_name: str) -> int:
    (number,) = [p["containerPort"] for p in container.get("ports", []) if p["name"] == port_name]
    return number


# -- schema ------------------------------------------------------------------------------------


def test_every_document_is_valid_kubernetes_in_strict_mode(target, docs):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    assert docs, f"k8s/{target} renders nothing"
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{name(doc)}: {str(exc).splitlines()[0]}")
    assert not errors, "\n".join(errors)


def test_strict_validation_rejects_unknown_fields():
    """Guards the check above: strict mode is what catches misspelt fields."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    service = next(d for d in render("base") if d["kind"] == "Service")
    bad = {**service, "spec": {**service["spec"], "publishNotReadyAdresses": True}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_everything_is_in_the_pipespec_namespace(docs):
    assert [name(n) for n in of_kind(docs, "Namespace")] == ["pipespec"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "pipespec", f"{doc['kind']}/{name(doc)}"


# -- topology ----------------------------------------------------------------------------------


def test_one_stage_deployment_per_level_the_gateway_expects(docs):
    num_levels = int(
        env_of(gateway_deployment(docs)["spec"]["template"]["spec"]["containers"][0], docs)[
            "PIPESPEC_GATEWAY_NUM_LEVELS"
        ]
    )
    stages = stage_deployments(docs)
    assert len(stages) == num_levels
    assert sorted(level_of(d) for d in stages) == list(range(num_levels))


def test_every_level_has_a_headless_service_selecting_exactly_its_pods(docs):
    stages = stage_deployments(docs)
    services = [s for s in of_kind(docs, "Service") if component(s) == "stage"]
    for deployment in stages:
        assert selects(deployment["spec"]["selector"], pod_labels(deployment)), name(deployment)
        mine = [s for s in services if selects(s["spec"]["selector"], pod_labels(deployment))]
        assert len(mine) == 1, f"{name(deployment)}: {len(mine)} Services select its pods"
        (service,) = mine
        assert service["spec"].get("clusterIP") == "None", f"{name(service)} is not headless"
        others = [d for d in stages if d is not deployment]
        assert not any(selects(service["spec"]["selector"], pod_labels(d)) for d in others)
        # Its ports name real container ports.
        (stage,) = deployment["spec"]["template"]["spec"]["containers"]
        for p in service["spec"]["ports"]:
            assert port(stage, p["targetPort"]) == p["port"]


def test_every_service_selects_some_workload(docs):
    deployments = of_kind(docs, "Deployment")
    for service in of_kind(docs, "Service"):
        pods = [d for d in deployments if selects(service["spec"]["selector"], pod_labels(d))]
        assert pods, f"Service {name(service)} selects no pods"
        for p in service["spec"]["ports"]:
            for d in pods:
                port(d["spec"]["template"]["spec"]["containers"][0], p["targetPort"])


def test_gateway_services_registry_reaches_an_unready_gateway(docs):
    """The gateway turns ready only once stages have registered, so the registry Service must not
    wait for readiness; the client-facing one must."""
    stage_env = env_of(
        stage_deployments(docs)[0]["spec"]["template"]["spec"]["containers"][0], docs
    )
    host, registry_port = re.fullmatch(
        r"tcp://([^:]+):(\d+)", stage_env["PIPESPEC_STAGE_GATEWAY"]
    ).groups()
    services = {name(s): s for s in of_kind(docs, "Service")}
    registry = services[host]
    assert registry["spec"].get("publishNotReadyAddresses") is True
    assert int(registry_port) in [p["port"] for p in registry["spec"]["ports"]]
    gateway = gateway_deployment(docs)
    assert selects(registry["spec"]["selector"], pod_labels(gateway))
    http = services["pipespec-gateway"]
    assert not http["spec"].get("publishNotReadyAddresses")
    assert 8000 in [p["port"] for p in http["spec"]["ports"]]


def test_every_deployment_has_a_disruption_budget_and_an_autoscaler(docs):
    pdbs, hpas = of_kind(docs, "PodDisruptionBudget"), of_kind(docs, "HorizontalPodAutoscaler")
    for deployment in of_kind(docs, "Deployment"):
        mine = [p for p in pdbs if selects(p["spec"]["selector"], pod_labels(deployment))]
        assert len(mine) == 1, f"{name(deployment)}: {len(mine)} PodDisruptionBudgets"
        scalers = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name(deployment)]
        assert len(scalers) == 1, f"{name(deployment)}: {len(scalers)} autoscalers"
        (hpa,) = scalers
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert "replicas" not in deployment["spec"], (
            f"{name(deployment)}: the autoscaler owns replicas"
        )
        metrics = hpa["spec"]["metrics"]
        if component(deployment) == "stage":
            assert [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"] == [
                "pipespec_stage_queue_depth"
            ]
        else:
            assert [m["resource"]["name"] for m in metrics if m["type"] == "Resource"] == ["cpu"]


# -- containers --------------------------------------------------------------------------------


def test_every_container_has_probes_and_resources(docs):
    for owner, pod in pod_specs(docs):
        for c in containers(pod):
            where = f"{owner}/{c['name']}"
            for kind in ("requests", "limits"):
                got = c.get("resources", {}).get(kind, {})
                assert {"cpu", "memory"} <= got.keys(), f"{where}: resources.{kind} = {got}"
        if owner.startswith("Deployment/"):  # a Job's container runs to completion: no probes
            for c in pod["containers"]:
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in c, f"{owner}/{c['name']}: no {probe}"
                    port(c, c[probe]["httpGet"]["port"])  # probes name a declared port


def test_stage_probes_match_the_stage_http_endpoints(docs):
    for deployment in stage_deployments(docs):
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        env = env_of(c, docs)
        assert port(c, "metrics") == int(env["PIPESPEC_STAGE_METRICS_PORT"])
        assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, (
            "model load needs time"
        )


def test_stages_outlive_their_drain(docs, monkeypatch):
    """SIGTERM starts a drain of drain_timeout_s; Kubernetes must not SIGKILL before it ends."""
    for deployment in stage_deployments(docs):
        pod = deployment["spec"]["template"]["spec"]
        settings = settings_of(StageSettings, env_of(pod["containers"][0], docs), monkeypatch)
        assert pod["terminationGracePeriodSeconds"] >= settings.drain_timeout_s + 10, name(
            deployment
        )


def test_images_are_pinned(docs):
    for owner, pod in pod_specs(docs):
        for c in containers(pod):
            image = c["image"]
            if "@sha256:" in image:
                continue
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag, f"{owner}/{c['name']}: {image!r} has no tag"
            assert tag != "latest", f"{owner}/{c['name']}: {image!r}"


def test_no_privileges(docs):
    for owner, pod in pod_specs(docs):
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), owner
        assert pod["securityContext"]["runAsNonRoot"] is True, owner
        assert pod["securityContext"]["runAsUser"] != 0, owner
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", owner
        assert pod.get("automountServiceAccountToken") is False, owner
        # Service links would put PIPESPEC_GATEWAY_*/PIPESPEC_STAGE_* variables in the environment.
        assert pod.get("enableServiceLinks") is False, owner
        for c in containers(pod):
            sc, where = c.get("securityContext", {}), f"{owner}/{c['name']}"
            assert sc.get("privileged") is not True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:  # a read-only root: /tmp is an emptyDir
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{owner}/{c['name']}: no /tmp"


def test_model_cache_is_read_only_for_services_and_written_by_the_job(docs):
    claims = [name(p) for p in of_kind(docs, "PersistentVolumeClaim")]
    assert claims == ["pipespec-models"]
    jobs = of_kind(docs, "Job")
    assert [name(j) for j in jobs] == ["pipespec-prepare-models"]
    for owner, pod in pod_specs(docs):
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
            claim = volumes[mount["name"]]["persistentVolumeClaim"]
            assert claim["claimName"] == "pipespec-models"
            writer = owner.startswith("Job/")
            assert bool(mount.get("readOnly")) is not writer, f"{owner}/{c['name']}"
            assert bool(claim.get("readOnly")) is not writer, owner


def test_gpu_overlays_request_gpus_and_cpu_ones_do_not(target, docs, monkeypatch):
    on_cuda = 0
    for deployment in stage_deployments(docs):
        pod = deployment["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        settings = settings_of(StageSettings, env_of(c, docs), monkeypatch)
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        if settings.device.startswith("cuda"):
            on_cuda += 1
            assert int(limits.get(GPU_RESOURCE, 0)) >= 1, (
                f"{name(deployment)} runs on CUDA without a GPU"
            )
            assert requests.get(GPU_RESOURCE, limits[GPU_RESOURCE]) == limits[GPU_RESOURCE]
            assert pod.get("nodeSelector"), f"{name(deployment)}: no nodeSelector for GPU nodes"
            assert any(t.get("key") == GPU_RESOURCE for t in pod.get("tolerations", []))
        else:
            assert GPU_RESOURCE not in limits, f"{name(deployment)} holds a GPU it does not use"
    if target.startswith("overlays/gpu-"):
        assert on_cuda >= 1, f"{target} puts no level on a GPU"
    else:
        assert on_cuda == 0, f"{target} is a CPU deployment"


# -- settings ----------------------------------------------------------------------------------


def test_config_map_keys_are_settings_fields(docs):
    for config_map in of_kind(docs, "ConfigMap"):
        for key in config_map.get("data", {}):
            prefix = next((p for p in PREFIXES if key.startswith(p)), None)
            assert prefix, f"ConfigMap {name(config_map)}: {key} is not PIPESPEC_GATEWAY_/STAGE_*"
            field = key[len(prefix) :].lower()
            cls = PREFIXES[prefix]
            assert field in cls.model_fields, (
                f"ConfigMap {name(config_map)}: {cls.__name__} has no {field!r}"
            )


def test_every_level_loads_valid_settings_that_fit_the_pod(docs, monkeypatch):
    gateway_container = gateway_deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    gateway = settings_of(GatewaySettings, env_of(gateway_container, docs), monkeypatch)
    assert gateway.http_host == gateway.bind_host == "0.0.0.0"
    assert gateway.advertise_host == POD_IP
    assert [port(gateway_container, n) for n in ("http", "registry", "zmq-client")] == [
        gateway.http_port,
        gateway.registry_port,
        gateway.client_port,
    ]
    levels = {}
    for deployment in stage_deployments(docs):
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["python", "-m", "services.stage"]
        s = settings_of(StageSettings, env_of(c, docs), monkeypatch)
        assert s.level == level_of(deployment), name(deployment)
        assert s.bind_host == "0.0.0.0" and s.advertise_host == POD_IP
        assert s.gateway.endswith(f":{gateway.registry_port}")
        assert (port(c, "inbox"), port(c, "notices")) == (s.inbox_port, s.notices_port)
        assert s.inbox_port and s.notices_port, "NetworkPolicy needs fixed ports"
        levels[s.level] = s
    target = levels[max(levels)]
    assert target.backend == "hf", "the top level verifies with the full model"
    assert gateway.tokenizer == target.model, "the gateway tokenizes with the target's tokenizer"


# -- network -----------------------------------------------------------------------------------


def allowed(docs, source: dict[str, str], dest: dict[str, str], port_number: int) -> bool:
    """Whether the namespace's NetworkPolicies let a pod labelled ``source`` (same namespace)
    reach a pod labelled ``dest`` on TCP ``port_number``."""
    policies = [
        p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], dest)
    ]
    assert policies, f"no NetworkPolicy selects {dest}"
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = [p["port"] for p in rule.get("ports", [])]
            if ports and port_number not in ports:
                continue
            peers = rule.get("from")
            if not peers or any(
                "podSelector" in peer
                and "namespaceSelector" not in peer
                and selects(peer["podSelector"], source)
                for peer in peers
            ):
                return True
    return False


def test_network_policies_allow_exactly_the_pipespec_paths(docs):
    gateway = pod_labels(gateway_deployment(docs))
    stages = [pod_labels(d) for d in stage_deployments(docs)]
    (job,) = [pod_labels(j) for j in of_kind(docs, "Job")]
    outsider = {"app": "something-else"}
    assert any(
        p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]
        for p in of_kind(docs, "NetworkPolicy")
    ), "no default-deny ingress policy"

    def who(labels: dict[str, str]) -> str:
        return labels.get("app.kubernetes.io/component", "outsider") + (
            f"-{labels['pipespec/level']}" if "pipespec/level" in labels else ""
        )

    for stage in stages:
        for port_number in (5560, 5561):  # inbox, notices
            for peer in (gateway, *stages):
                assert allowed(docs, peer, stage, port_number), (
                    f"{who(peer)} -> {who(stage)}:{port_number}"
                )
            for peer in (outsider, job):
                assert not allowed(docs, peer, stage, port_number), (
                    f"{who(peer)} -> {who(stage)}:{port_number}"
                )
        assert allowed(docs, stage, gateway, 5550), f"{who(stage)} -> gateway:5550"
    assert allowed(docs, outsider, gateway, 8000), "clients -> gateway:8000"
    assert not allowed(docs, outsider, gateway, 5550), "anyone -> gateway registry"
    assert not allowed(docs, outsider, gateway, 5551), "anyone -> gateway ZMQ client API"


# -- keys --------------------------------------------------------------------------------------


def role_of(deployment: Doc) -> str:
    return "gateway" if component(deployment) == "gateway" else f"level{level_of(deployment)}"


def test_every_deployment_mounts_its_own_key_secret_and_the_public_keys(docs, monkeypatch):
    """CURVE (common/security.py): each pod gets every public key and only its role's secret,
    from one Secret per level and one for the gateway, where its settings look for them."""
    deployments = [gateway_deployment(docs), *stage_deployments(docs)]
    secrets = set()
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (c,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        cls = GatewaySettings if component(deployment) == "gateway" else StageSettings
        settings = settings_of(cls, env_of(c, docs), monkeypatch)
        assert not settings.insecure, name(deployment)
        secret_dir, secret_file = settings.secret_key.rsplit("/", 1)
        secret_mount, public_mount = mounts[secret_dir], mounts[settings.public_keys]
        assert secret_mount["readOnly"] and public_mount["readOnly"], name(deployment)
        secret = volumes[secret_mount["name"]]["secret"]
        assert secret["secretName"] == security.k8s_secret_name(role_of(deployment))
        assert secret.get("optional") is not True and secret["defaultMode"] & 0o077 == 0o040
        assert volumes[public_mount["name"]]["configMap"]["name"] == "pipespec-public-keys"
        assert secret_file == "key_secret"
        secrets.add(secret["secretName"])
    assert len(secrets) == len(deployments), "one Secret per level and one for the gateway"


def test_the_key_command_makes_exactly_what_the_deployments_mount(target, docs, tmp_path):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    levels = len(stage_deployments(docs))
    made = security.k8s_manifests(security.generate(tmp_path / "keys", levels), levels)
    for doc in made:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    names = {(d["kind"], name(d)) for d in made}
    for deployment in [gateway_deployment(docs), *stage_deployments(docs)]:
        for volume in deployment["spec"]["template"]["spec"]["volumes"]:
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in names
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in names
    secret = next(d for d in made if name(d) == "pipespec-keys-level-0")
    path = tmp_path / "level0.key_secret"
    path.write_text(secret["stringData"]["key_secret"])
    public = tmp_path / "public"
    public.mkdir()
    for file, text in made[0]["data"].items():
        (public / file).write_text(text)
    assert security.load_curve("level0", public, path).role == "level0"  # loads as mounted
