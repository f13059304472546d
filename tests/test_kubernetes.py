"""
The Kubernetes manifests (C{deploy/kubernetes/}): the base, every overlay,
and every component on top of every overlay are rendered with C{kubectl
kustomize}, and each rendered document is validated against the API
schemas of Kubernetes L{KUBERNETES_VERSION} (kubernetes-validate, strict:
a field the API does not know fails). The ServiceMonitor is the kind of a
CustomResourceDefinition (the Prometheus Operator's), for which
kubernetes-validate has no schema: it is checked here field by field.

Then what the manifests' comments promise, computed from the rendered
objects with wsproxy's own settings parser: the kubelet waits long enough
for the shutdown sequence (C{preStop}, then the overlapping drain window and
grace period); the probes ask C{/ready} and C{/health} on the port wsproxy
listens on, and liveness rides out a short Redis outage; the pod runs
unprivileged on a read-only root; the memory limit fits C{MAX_CONNECTIONS};
the Service, the PodDisruptionBudget and the HorizontalPodAutoscaler point
at the wsproxy pods and nothing else.

kubectl must be on C{PATH}: without it these tests fail (they never skip),
so that CI cannot pass without having checked the manifests.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from typing import Any, Iterator, Mapping, Optional

import kubernetes_validate
import yaml
from twisted.trial.unittest import SynchronousTestCase

from wsproxy.config import SETTINGS, Settings, load_settings

from .support import ROOT

KUSTOMIZE = os.path.join(ROOT, "deploy", "kubernetes")

#: the release every document is validated against (kubectl here is 1.32)
KUBERNETES_VERSION = "1.32.0"

#: every overlay, and every component, that the tests render; a directory
#: under deploy/kubernetes/ with a kustomization.yaml that is not here fails
#: L{LayoutTests.test_every_kustomization_is_rendered}
OVERLAYS = ("redis", "sentinel")
COMPONENTS = ("servicemonitor",)

#: seconds the kubelet must allow past preStop + max(drain, grace): up to
#: 1 s for the connections dropped at the end of the grace period to
#: unsubscribe (wsproxy/process/daemon.py), then closing Redis and the
#: process's exit (0.2 s measured past max(drain, grace), with a client that
#: never answers the close), with room to spare
SHUTDOWN_MARGIN = 5

#: liveness must tolerate at least this long a Redis outage (/health is 503
#: meanwhile) before it restarts a pod
REDIS_OUTAGE_SECS = 60

#: the sizing formula in deployment.yaml: a fresh idle process's RSS (65.8
#: MiB measured outside a container, 63.8 MiB inside), the largest RSS per
#: idle connection in docs/benchmarks.md, and the headroom over their sum
IDLE_PROCESS_MIB = 64.0
CONNECTION_KIB = 6.1
MEMORY_HEADROOM = 1.5

WSPROXY_LABELS = {"app.kubernetes.io/name": "wsproxy", "app.kubernetes.io/component": "proxy"}

SERVICE_MONITOR_FIELDS = {
    "top": {"apiVersion", "kind", "metadata", "spec"},
    "spec": {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels",
             "podTargetLabels", "sampleLimit"},
    "endpoint": {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                 "relabelings", "metricRelabelings", "tlsConfig", "params"},
}


def kubectl(environ: Optional[Mapping[str, str]] = None) -> str:
    """
    The path of kubectl on C{PATH} (of C{environ}, default this process's).

    @raise AssertionError: if there is none, saying how to get one.
    """
    path = (os.environ if environ is None else environ).get("PATH", os.defpath)
    found = shutil.which("kubectl", path=path)
    if found is None:
        raise AssertionError(
            "kubectl not found on PATH: tests/test_kubernetes.py renders "
            "deploy/kubernetes/ with `kubectl kustomize` (kubectl 1.27 or newer, "
            "e.g. /usr/bin/kubectl)"
        )
    return found


def kustomize(directory: str) -> list[dict[str, Any]]:
    """
    The documents C{kubectl kustomize directory} renders.
    """
    done = subprocess.run(
        [kubectl(), "kustomize", directory], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{done.stderr}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


@functools.cache
def rendered(name: str) -> tuple[dict[str, Any], ...]:
    """
    The rendering called C{name}: C{"base"}, C{"overlays/<overlay>"}, or
    C{"overlays/<overlay>+<component>"} (the overlay with the component
    added, as a user adds it: a kustomization of their own naming both,
    here in a temporary directory).
    """
    if "+" not in name:
        return tuple(kustomize(os.path.join(KUSTOMIZE, name)))
    overlay, component = name.split("+")
    with tempfile.TemporaryDirectory() as mine:
        # kustomize refuses absolute paths to other kustomizations
        relative = os.path.relpath(KUSTOMIZE, mine)
        with open(os.path.join(mine, "kustomization.yaml"), "w") as f:
            yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"{relative}/{overlay}"],
                "components": [f"{relative}/components/{component}"],
            }, f)
        return tuple(kustomize(mine))


def renderings() -> Iterator[str]:
    """
    The name of every rendering the tests check.
    """
    yield "base"
    for overlay in OVERLAYS:
        yield f"overlays/{overlay}"
        for component in COMPONENTS:
            yield f"overlays/{overlay}+{component}"


def only(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    [found] = [c for c in containers if c["name"] == name]
    return found


def environment(docs: tuple[dict[str, Any], ...], c: dict[str, Any]) -> dict[str, str]:
    """
    The variables the manifests give container C{c}: its ConfigMaps'
    (C{envFrom}, in order), then its C{env}, which wins. Optional Secrets
    are not in the rendering, and are left out.
    """
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(only(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in c.get("env", []):
        env[variable["name"]] = variable["value"]
    return env


def settings_of(docs: tuple[dict[str, Any], ...]) -> Settings:
    """
    wsproxy's settings in the rendered wsproxy container, through
    wsproxy's own parser (so, as the daemon would read them).
    """
    c = container(only(docs, "Deployment", "wsproxy"), "wsproxy")
    return load_settings(environ=environment(docs, c), dotenv_path=None)


def quantity(text: str) -> float:
    """
    A Kubernetes quantity as a plain number (C{"288Mi"} bytes, C{"500m"}
    cores).
    """
    units = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
             "k": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text))
    assert match is not None, f"not a quantity: {text!r}"
    return float(match.group(1)) * units[match.group(2)]


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def pod_templates(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, str]]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield doc["metadata"]["name"], doc["spec"]["template"]["metadata"]["labels"]


class LayoutTests(SynchronousTestCase):
    def test_every_kustomization_is_rendered(self) -> None:
        """
        Every directory under deploy/kubernetes/ holding a kustomization is
        the base, an overlay in L{OVERLAYS} or a component in
        L{COMPONENTS}: a new overlay cannot be left out of these tests.
        """
        found = {
            os.path.relpath(directory, KUSTOMIZE)
            for directory, _, files in os.walk(KUSTOMIZE)
            if {"kustomization.yaml", "kustomization.yml", "Kustomization"} & set(files)
        }
        expected = {"base", *(f"overlays/{o}" for o in OVERLAYS),
                    *(f"components/{c}" for c in COMPONENTS)}
        self.assertEqual(found, expected,
                         "add the overlay (or component) to OVERLAYS (or COMPONENTS) "
                         "in tests/test_kubernetes.py")

    def test_without_kubectl_the_tests_fail(self) -> None:
        """
        Without kubectl on PATH the tests fail, saying what is missing;
        they do not skip.
        """
        with tempfile.TemporaryDirectory() as empty:
            e = self.assertRaises(AssertionError, kubectl, {"PATH": empty})
        self.assertIn("kubectl not found on PATH", str(e))


class SchemaTests(SynchronousTestCase):
    def test_documents_validate(self) -> None:
        """
        Every rendered document but the ServiceMonitor validates, strictly,
        against the schemas of Kubernetes L{KUBERNETES_VERSION}.
        """
        errors = []
        for name in renderings():
            for doc in rendered(name):
                if doc["kind"] == "ServiceMonitor":
                    continue
                where = f"{name}: {doc['kind']}/{doc['metadata']['name']}"
                try:
                    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError as e:
                    errors.append(f"{where}: {e.message}")
        self.assertEqual(errors, [])

    def test_strict_validation_refuses_unknown_fields(self) -> None:
        """
        The validation really is strict: a misspelt field fails.
        """
        deployment = only(rendered("base"), "Deployment", "wsproxy")
        spelt = yaml.safe_load(yaml.safe_dump(deployment).replace(
            "readOnlyRootFilesystem", "readOnlyRootFileSystem"))
        self.assertRaises(kubernetes_validate.ValidationError,
                          kubernetes_validate.validate, spelt, KUBERNETES_VERSION, True)

    def test_service_monitor(self) -> None:
        """
        The ServiceMonitor (no schema here: its CRD is the Prometheus
        Operator's) has only fields of monitoring.coreos.com/v1, selects the
        wsproxy Service and scrapes /metrics on a port the Service names.
        """
        for overlay in OVERLAYS:
            for component in COMPONENTS:
                docs = rendered(f"overlays/{overlay}+{component}")
                monitor = only(docs, "ServiceMonitor", "wsproxy")
                service = only(docs, "Service", "wsproxy")
                self.assertEqual(monitor["apiVersion"], "monitoring.coreos.com/v1")
                self.assertLessEqual(set(monitor), SERVICE_MONITOR_FIELDS["top"])
                spec = monitor["spec"]
                self.assertLessEqual(set(spec), SERVICE_MONITOR_FIELDS["spec"])
                self.assertEqual(set(spec["selector"]), {"matchLabels"})
                self.assertTrue(selects(spec["selector"]["matchLabels"],
                                        service["metadata"]["labels"]))
                ports = {p["name"] for p in service["spec"]["ports"]}
                self.assertTrue(spec["endpoints"])
                for endpoint in spec["endpoints"]:
                    self.assertLessEqual(set(endpoint), SERVICE_MONITOR_FIELDS["endpoint"])
                    self.assertIn(endpoint["port"], ports)
                    self.assertEqual(endpoint["path"], "/metrics")
                    self.assertRegex(endpoint["interval"], r"^[0-9]+s$")
                    self.assertLess(int(endpoint["scrapeTimeout"][:-1]),
                                    int(endpoint["interval"][:-1]))
            # and no overlay needs the operator's CRDs
            self.assertNotIn("ServiceMonitor", {d["kind"] for d in rendered(f"overlays/{overlay}")})


class DeploymentTests(SynchronousTestCase):
    def each(self) -> Iterator[tuple[str, tuple[dict[str, Any], ...], dict[str, Any]]]:
        for name in renderings():
            docs = rendered(name)
            yield name, docs, only(docs, "Deployment", "wsproxy")

    def test_termination_grace_covers_the_shutdown(self) -> None:
        """
        terminationGracePeriodSeconds, which counts from the start of
        termination, covers the preStop sleep, then the drain window and
        the grace period (both start at SIGTERM, the grace period after
        SHUTDOWN_CLOSE_DELAY_SECS: the longer one decides), then
        L{SHUTDOWN_MARGIN}.
        """
        for name, docs, deployment in self.each():
            pod = deployment["spec"]["template"]["spec"]
            c = container(deployment, "wsproxy")
            command = c["lifecycle"]["preStop"]["exec"]["command"]
            self.assertEqual(command[:-1], ["/bin/sleep"], name)
            pre_stop = float(command[-1])
            settings = settings_of(docs)
            close_delay = min(settings.shutdown_close_delay, settings.shutdown_drain)
            needed = (pre_stop + max(settings.shutdown_drain,
                                     close_delay + settings.shutdown_grace_period)
                      + SHUTDOWN_MARGIN)
            self.assertGreaterEqual(
                pod["terminationGracePeriodSeconds"], needed,
                f"{name}: preStop {pre_stop:g} + max(SHUTDOWN_DRAIN_SECS "
                f"{settings.shutdown_drain:g}, SHUTDOWN_CLOSE_DELAY_SECS {close_delay:g} + "
                f"SHUTDOWN_GRACE_PERIOD_SECS {settings.shutdown_grace_period:g}) "
                f"+ {SHUTDOWN_MARGIN}")
            # a drain window, so that stragglers get 503 rather than a refusal
            self.assertGreater(settings.shutdown_drain, 0, name)

    def test_probes(self) -> None:
        """
        Start-up and readiness ask /ready, liveness /health, all on the
        port wsproxy listens on (PORT, the container port); liveness
        restarts a pod only after a Redis outage of L{REDIS_OUTAGE_SECS}.
        """
        for name, docs, deployment in self.each():
            c = container(deployment, "wsproxy")
            settings = settings_of(docs)
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            self.assertEqual(list(ports.values()), [settings.port], name)
            self.assertEqual(settings.listen, "", name)
            for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"),
                                ("livenessProbe", "/health")):
                get = c[probe]["httpGet"]
                self.assertEqual(get["path"], path, f"{name}: {probe}")
                self.assertEqual(ports.get(get["port"], get["port"]), settings.port,
                                 f"{name}: {probe}")
            liveness = c["livenessProbe"]
            tolerated = liveness["periodSeconds"] * liveness["failureThreshold"]
            self.assertGreaterEqual(tolerated, REDIS_OUTAGE_SECS, name)

    def test_security_context(self) -> None:
        """
        The wsproxy pod (and every other pod the overlays add) runs as a
        non-root user (wsproxy's: the image's uid and gid 10001), on a
        read-only root filesystem, with no capability, no privilege
        escalation, the runtime's default seccomp profile and no service
        account token.
        """
        for name in renderings():
            docs = rendered(name)
            for doc in docs:
                if doc["kind"] not in ("Deployment", "StatefulSet"):
                    continue
                pod = doc["spec"]["template"]["spec"]
                where = f"{name}: {doc['metadata']['name']}"
                self.assertIs(pod["automountServiceAccountToken"], False, where)
                for c in pod["containers"] + pod.get("initContainers", []):
                    effective = {**pod.get("securityContext", {}), **c["securityContext"]}
                    self.assertIs(effective["runAsNonRoot"], True, where)
                    self.assertIs(effective["readOnlyRootFilesystem"], True, where)
                    self.assertIs(effective["allowPrivilegeEscalation"], False, where)
                    self.assertEqual(effective["capabilities"], {"drop": ["ALL"]}, where)
                    self.assertEqual(effective["seccompProfile"], {"type": "RuntimeDefault"},
                                     where)
                    if doc["metadata"]["name"] == "wsproxy":
                        self.assertEqual(
                            (effective["runAsUser"], effective["runAsGroup"]),
                            (10001, 10001), where)

    def test_resources_fit_the_connection_cap(self) -> None:
        """
        MAX_CONNECTIONS is set, and the memory limit holds that many idle
        connections in every process by the formula in deployment.yaml;
        the CPU limit gives every worker a core; requests do not exceed
        limits, and memory's equals its limit.
        """
        for name, docs, deployment in self.each():
            resources = container(deployment, "wsproxy")["resources"]
            settings = settings_of(docs)
            self.assertGreater(settings.max_connections, 0, name)
            processes = settings.workers + (1 if settings.workers > 1 else 0)
            needed = MEMORY_HEADROOM * (
                processes * IDLE_PROCESS_MIB * 2**20
                + settings.workers * settings.max_connections * CONNECTION_KIB * 2**10)
            limits, requests = resources["limits"], resources["requests"]
            self.assertGreaterEqual(quantity(limits["memory"]), needed, name)
            self.assertEqual(requests["memory"], limits["memory"], name)
            self.assertGreaterEqual(quantity(limits["cpu"]), settings.workers, name)
            self.assertLessEqual(quantity(requests["cpu"]), quantity(limits["cpu"]), name)

    def test_spread_and_metrics(self) -> None:
        """
        The pods spread over nodes as a preference (never left pending for
        it), and say where Prometheus finds their metrics.
        """
        for name, docs, deployment in self.each():
            template = deployment["spec"]["template"]
            spread = {(t["topologyKey"], t["whenUnsatisfiable"])
                      for t in template["spec"]["topologySpreadConstraints"]}
            self.assertIn(("kubernetes.io/hostname", "ScheduleAnyway"), spread, name)
            for t in template["spec"]["topologySpreadConstraints"]:
                self.assertEqual(t["labelSelector"]["matchLabels"], WSPROXY_LABELS, name)
            annotations = template["metadata"]["annotations"]
            self.assertEqual(annotations["prometheus.io/scrape"], "true", name)
            self.assertEqual(int(annotations["prometheus.io/port"]), settings_of(docs).port,
                             name)
            self.assertEqual(annotations["prometheus.io/path"], "/metrics", name)

    def test_settings_are_known(self) -> None:
        """
        Every variable the manifests give wsproxy is one of its settings (a
        misspelt one would be ignored), and no ConfigMap holds a password.
        """
        known = {s.env for s in SETTINGS}
        for name, docs, deployment in self.each():
            env = environment(docs, container(deployment, "wsproxy"))
            self.assertEqual(sorted(set(env) - known), [], name)
            self.assertIsNone(settings_of(docs).redis.password, name)
            self.assertNotIn("REDIS_SENTINEL_PASSWORD", env, name)
            self.assertNotIn("JWT_SECRET", env, name)

    def test_image(self) -> None:
        """
        The image is "wsproxy", with a tag kustomize sets (images:); the
        Redis overlay's is the official redis:7.
        """
        for name, docs, deployment in self.each():
            self.assertRegex(container(deployment, "wsproxy")["image"], r"^wsproxy:[\w.-]+$",
                             name)
        redis = only(rendered("overlays/redis"), "Deployment", "redis")
        self.assertEqual(container(redis, "redis")["image"], "redis:7")


class SelectorTests(SynchronousTestCase):
    def test_selectors_pick_the_wsproxy_pods(self) -> None:
        """
        The Deployment's, the Service's and the PodDisruptionBudget's
        selectors match the wsproxy pods and no other pod of the rendering
        (Redis's, in the redis overlay), and the Service sends its port to
        the container's.
        """
        for name in renderings():
            docs = rendered(name)
            deployment = only(docs, "Deployment", "wsproxy")
            service = only(docs, "Service", "wsproxy")
            budget = only(docs, "PodDisruptionBudget", "wsproxy")
            for what, selector in (
                ("Deployment", deployment["spec"]["selector"]["matchLabels"]),
                ("Service", service["spec"]["selector"]),
                ("PodDisruptionBudget", budget["spec"]["selector"]["matchLabels"]),
            ):
                matched = [pods for pods, labels in pod_templates(docs)
                           if selects(selector, labels)]
                self.assertEqual(matched, ["wsproxy"], f"{name}: {what}")
            ports = {p["name"] for p in container(deployment, "wsproxy")["ports"]}
            for port in service["spec"]["ports"]:
                self.assertIn(port["targetPort"], ports, name)

    def test_autoscaler_owns_the_replicas(self) -> None:
        """
        The HorizontalPodAutoscaler scales the wsproxy Deployment on CPU
        from at least two pods (so the budget lets one go), and the
        Deployment names no replica count that an apply would reset.
        """
        for name in renderings():
            docs = rendered(name)
            hpa = only(docs, "HorizontalPodAutoscaler", "wsproxy")
            target = hpa["spec"]["scaleTargetRef"]
            self.assertEqual((target["apiVersion"], target["kind"], target["name"]),
                             ("apps/v1", "Deployment", "wsproxy"), name)
            self.assertEqual(hpa["apiVersion"], "autoscaling/v2", name)
            self.assertEqual([m["resource"]["name"] for m in hpa["spec"]["metrics"]], ["cpu"],
                             name)
            self.assertGreaterEqual(hpa["spec"]["minReplicas"], 2, name)
            self.assertNotIn("replicas", only(docs, "Deployment", "wsproxy")["spec"], name)


class OverlayTests(SynchronousTestCase):
    def test_redis_overlay_points_at_its_redis(self) -> None:
        """
        In the redis overlay, REDIS_URL names the Redis Service it deploys,
        on the port that Service serves and the Redis container listens on.
        """
        docs = rendered("overlays/redis")
        address = settings_of(docs).redis
        service = only(docs, "Service", address.host)
        self.assertIn(address.port, [p["port"] for p in service["spec"]["ports"]])
        [pods] = [pods for pods, labels in pod_templates(docs)
                  if selects(service["spec"]["selector"], labels)]
        redis = container(only(docs, "Deployment", pods), "redis")
        self.assertEqual([p["containerPort"] for p in redis["ports"]], [address.port])

    def test_sentinel_overlay_names_the_sentinels(self) -> None:
        """
        The sentinel overlay names three sentinels, each by its own name
        (not one Service: wsproxy takes the majority of their answers), and
        the master set; it deploys no Redis of its own.
        """
        docs = rendered("overlays/sentinel")
        settings = settings_of(docs)
        self.assertEqual(len({host for host, _ in settings.redis_sentinels}), 3)
        self.assertEqual(settings.redis_sentinel_master, "mymaster")
        self.assertEqual([name for name, _ in pod_templates(docs)], ["wsproxy"])
