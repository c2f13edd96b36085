#!/usr/bin/env python3
"""Checks deploy/ offline: the Kubernetes manifests and the Compose files.

Run by tests/tests/deploy.rs with the virtual environment that `scripts/setup.sh --test`
makes (kubernetes-validate, which bundles the Kubernetes JSON schemas, and jsonschema):

    ~/.cache/moemesh-deploy-venv/bin/python deploy/validate.py --moemesh target/debug/moemesh

1. Every kustomization in RENDER is rendered with `kustomize build` or `kubectl kustomize`
   (whichever is installed; without either, only the base's plain files are checked and the
   output says so).
2. Every object is validated strictly (unknown fields are errors) against the schemas of the
   oldest Kubernetes the manifests support and of the newest one kubernetes-validate knows.
   ServiceMonitor (a CRD) is validated against the CRD schema vendored in k8s/schemas/.
3. What schemas cannot see: every MOEMESH_* variable a container gets is a flag of its role
   (read from `moemesh <role> --help`), ports in probes and flags agree with the declared
   ports, $(VAR) references resolve, grace periods cover preStop plus the drain timeout,
   liveness cannot kill a draining pod, GPU images ask for one GPU, expert shards cover every
   routed expert once, and every selector selects something. Autoscaling (KEDA ScaledObjects,
   whose schema is vendored in k8s/schemas/ too): each scales a Deployment that exists and no
   HPA also scales, keeps at least 2 replicas, and its Prometheus queries read only metrics
   moemesh exports (services/common/src/metrics.rs), with numeric thresholds; a CPU trigger's
   pods request CPU.
4. The Compose files are validated against the Compose Specification's JSON schema (vendored in
   compose/compose-spec.json), and their services get the same flag and port checks.

Exit status 0 when everything passes; each problem is printed with the file and object.
"""

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
K8S = DEPLOY / "k8s"

# Native gRPC probes went GA in 1.27; the newest bundled version catches removals.
OLDEST = "1.27.0"
VERSIONS = [OLDEST, kubernetes_validate.latest_version()]

# kustomization → how many routed experts per layer its model has (the shards must cover them):
# DeepSeek-V2-Lite in the base, the embedded default model on CPU.
RENDER = {
    "base": 64,
    "overlays/production": 64,
    "overlays/external-etcd": 64,
    "overlays/cpu-embedded": 16,
    "overlays/autoscaling": 64,
}
# Where the exported metric names are declared (the one list of them).
METRICS_RS = DEPLOY.parent / "services" / "common" / "src" / "metrics.rs"

# Shared flag names of work landing in parallel (TLS, API keys, audit log): accepted even when
# the binary under test does not have them yet.
PENDING_ENV = {
    "MOEMESH_TLS_CERT",
    "MOEMESH_TLS_KEY",
    "MOEMESH_TLS_CA",
    "MOEMESH_PLAINTEXT",
    "MOEMESH_API_KEYS_FILE",
    "MOEMESH_AUDIT_LOG",
}
# Read by the process itself, not by a flag (the log filter).
PROCESS_ENV = {"MOEMESH_LOG"}
ROLES = ("frontend", "gate", "expert")


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, msg):
        self.items.append(f"{where}: {msg}")


def role_env(moemesh):
    """MOEMESH_* variables each role reads, from its --help ('[env: NAME=]')."""
    out = {}
    for role in ROLES:
        text = subprocess.run(
            [moemesh, role, "--help"], check=True, capture_output=True, text=True
        ).stdout
        out[role] = set(re.findall(r"\[env:\s*(MOEMESH_[A-Z0-9_]+)=", " ".join(text.split())))
        if not out[role]:
            sys.exit(f"`{moemesh} {role} --help` lists no MOEMESH_* variables")
    return out


def renderer():
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def strict(schema):
    """Unknown fields become errors, as with the API server's strict field validation."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for v in schema.values():
            strict(v)
    elif isinstance(schema, list):
        for v in schema:
            strict(v)
    return schema


def crd_validators():
    """(apiVersion, kind) → validator, for the CRDs vendored in k8s/schemas/."""
    out = {}
    for path in sorted((K8S / "schemas").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            spec = crd["spec"]
            for v in spec["versions"]:
                schema = strict(v["schema"]["openAPIV3Schema"])
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = (
                    jsonschema.Draft7Validator(schema),
                    path.name,
                )
    return out


def name_of(doc):
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def validate_schemas(docs, where, crds, problems):
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        if key in crds:
            validator, source = crds[key]
            for err in validator.iter_errors(doc):
                path = "/".join(str(p) for p in err.absolute_path)
                problems.add(f"{where} {name_of(doc)}", f"{source}: {path}: {err.message}")
            continue
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, True)
            except kubernetes_validate.ValidationError as err:
                path = "/".join(str(p) for p in err.path)
                problems.add(f"{where} {name_of(doc)}", f"Kubernetes {version}: {path}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError as err:
                problems.add(f"{where} {name_of(doc)}", err.message)


def port_of(addr):
    return int(str(addr).rsplit(":", 1)[1])


def parse_range(spec):
    out = []
    for part in str(spec).split(","):
        a, _, b = part.strip().partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


def check_container(where, role, env, ports, probes, known, problems):
    """Checks shared by Kubernetes containers and Compose services. `env`: name → value."""
    for name in env:
        if name.startswith("MOEMESH_") and name not in known[role] | PENDING_ENV | PROCESS_ENV:
            problems.add(where, f"{name} is not a flag of `moemesh {role}` (see its --help)")
    if "MOEMESH_LISTEN" not in env:
        problems.add(where, "no MOEMESH_LISTEN: the role would listen on 127.0.0.1 only")
    elif port_of(env["MOEMESH_LISTEN"]) not in ports:
        problems.add(where, f"MOEMESH_LISTEN {env['MOEMESH_LISTEN']} is not a declared port {sorted(ports)}")
    if "MOEMESH_METRICS_LISTEN" in env and port_of(env["MOEMESH_METRICS_LISTEN"]) not in ports:
        problems.add(where, f"MOEMESH_METRICS_LISTEN {env['MOEMESH_METRICS_LISTEN']} is not a declared port")
    serving = port_of(env.get("MOEMESH_LISTEN", ":0"))
    for kind, port in probes:
        if port != serving:
            problems.add(where, f"{kind} checks port {port}, but the role serves health on {serving}")


def exec_probe_port(cmd):
    """The --addr port of a `moemesh health` probe command, or None."""
    if not cmd or Path(cmd[0]).name != "moemesh" or "health" not in cmd or "--addr" not in cmd:
        return None
    return port_of(cmd[cmd.index("--addr") + 1])


def secret_mode_problems(spec, container):
    """Secret files the container cannot read. Kubernetes writes them owned by root, in group
    `fsGroup` when the pod sets one (and adds that group to the container's), with the volume's
    mode (default 0644, per item overridable): the process (runAsUser/runAsGroup) must be root,
    or the group must be one of its groups with group read, or others must have read."""
    pod, own = spec.get("securityContext", {}), container.get("securityContext", {})
    uid = own.get("runAsUser", pod.get("runAsUser"))
    gid = own.get("runAsGroup", pod.get("runAsGroup"))
    file_gid = pod.get("fsGroup", 0)
    groups = {g for g in [gid, pod.get("fsGroup"), *pod.get("supplementalGroups", [])] if g is not None}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    found = []
    for m in container.get("volumeMounts", []):
        secret = volumes.get(m["name"], {}).get("secret")
        if secret is None:
            continue
        modes = [secret.get("defaultMode", 0o644)] + [i["mode"] for i in secret.get("items", []) if "mode" in i]
        for mode in modes:
            readable = uid == 0 or mode & 0o004 or (mode & 0o040 and file_gid in groups)
            if not readable:
                found.append(
                    f"secret volume {m['name']!r} (mode {mode:#o}, group {file_gid}) is unreadable by "
                    f"uid {uid} gid {gid}: set the pod's fsGroup to {gid} or make the mode world-readable"
                )
    return found


def exported_metrics():
    """Every metric name moemesh exports, from the constants in metrics.rs."""
    names = set(re.findall(r'"(moemesh_[a-z0-9_]+)"', METRICS_RS.read_text()))
    if not names:
        sys.exit(f"{METRICS_RS} declares no moemesh_* metric")
    return names


def query_problems(query, exported):
    """The metric names of a PromQL query that moemesh does not export (a histogram's _bucket,
    _sum and _count series count as the histogram)."""
    found = []
    for name in re.findall(r"\bmoemesh_[a-z0-9_]+", query):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name not in exported and base not in exported:
            found.append(f"query reads {name}, which moemesh does not export")
    if not found and not re.search(r"\bmoemesh_", query):
        found.append("query reads no moemesh metric")
    return found


def check_scaling(docs, where, exported, problems):
    """KEDA ScaledObjects against the workloads they scale and the metrics they read."""
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    hpa_targets = {
        d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"
    }
    for d in docs:
        if d["kind"] != "ScaledObject":
            continue
        here = f"{where} {name_of(d)}"
        spec = d["spec"]
        ref = spec["scaleTargetRef"]
        target = deployments.get(ref["name"]) if ref.get("kind", "Deployment") == "Deployment" else None
        if target is None:
            problems.add(here, f"scaleTargetRef {ref.get('kind', 'Deployment')}/{ref['name']} does not exist")
        if ref["name"] in hpa_targets:
            problems.add(here, f"an HPA also scales {ref['name']}: KEDA makes its own, and the two would fight")
        low, high = spec.get("minReplicaCount", 0), spec.get("maxReplicaCount", 100)
        if low < 2:
            problems.add(here, f"minReplicaCount {low}: keep at least 2 (the PDB lets one pod go; a lone pod could be drained away)")
        if high < low:
            problems.add(here, f"maxReplicaCount {high} < minReplicaCount {low}")
        for i, t in enumerate(spec["triggers"]):
            at, meta = f"{here} triggers[{i}] ({t['type']})", t.get("metadata", {})
            if t["type"] == "prometheus":
                for key in ("serverAddress", "query", "threshold"):
                    if not meta.get(key):
                        problems.add(at, f"no {key}")
                for p in query_problems(meta.get("query", ""), exported):
                    problems.add(at, p)
                for key in ("threshold", "activationThreshold"):
                    if key in meta:
                        try:
                            if float(meta[key]) < 0:
                                raise ValueError
                        except ValueError:
                            problems.add(at, f"{key} {meta[key]!r} is not a number >= 0")
            elif t["type"] in ("cpu", "memory"):
                if t.get("metricType") != "Utilization" or "value" not in meta:
                    problems.add(at, "a resource trigger needs metricType Utilization and a value")
                containers = (target or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
                for c in containers:
                    if t["type"] not in c.get("resources", {}).get("requests", {}):
                        problems.add(at, f"container {c['name']} requests no {t['type']}: utilization is of the request")
            else:
                problems.add(at, f"trigger type {t['type']!r}: only prometheus, cpu and memory are used here")


def self_test():
    """The checks must catch what they are for: the production overlay's old secret mistake
    (0440, no fsGroup), and a ScaledObject on a missing Deployment reading a metric that does
    not exist, beside an HPA of the same Deployment."""
    docs = [
        {"kind": "Deployment", "metadata": {"name": "moemesh-gate"}, "spec": {"template": {"spec": {"containers": []}}}},
        {"kind": "HorizontalPodAutoscaler", "metadata": {"name": "h"}, "spec": {"scaleTargetRef": {"name": "moemesh-gate"}}},
        {"kind": "ScaledObject", "metadata": {"name": "s"}, "spec": {
            "scaleTargetRef": {"name": "moemesh-gaet"}, "minReplicaCount": 2, "triggers": [
                {"type": "prometheus", "metadata": {"serverAddress": "http://p:9090", "threshold": "x",
                                                     "query": "sum(moemesh_gate_kv_blocks_usde)"}}]}},
        {"kind": "ScaledObject", "metadata": {"name": "t"}, "spec": {
            "scaleTargetRef": {"name": "moemesh-gate"}, "minReplicaCount": 1, "triggers": [
                {"type": "prometheus", "metadata": {"serverAddress": "http://p:9090", "threshold": "1",
                                                     "query": "histogram_quantile(0.9, rate(moemesh_expert_forward_duration_seconds_bucket[1m]))"}}]}},
    ]
    found = Problems()
    check_scaling(docs, "self-test", {"moemesh_gate_kv_blocks_used", "moemesh_expert_forward_duration_seconds"}, found)
    text = "\n".join(found.items)
    for needle in ("moemesh-gaet does not exist", "moemesh_gate_kv_blocks_usde", "threshold 'x'",
                   "an HPA also scales moemesh-gate", "minReplicaCount 1"):
        assert needle in text, f"the scaling checks missed {needle!r}:\n{text}"
    assert "forward_duration" not in text, f"a histogram's _bucket series is exported:\n{text}"

    spec = {
        "securityContext": {"runAsUser": 10001, "runAsGroup": 10001},
        "volumes": [{"name": "tls", "secret": {"secretName": "t", "defaultMode": 0o440}}],
    }
    container = {"volumeMounts": [{"name": "tls", "mountPath": "/tls"}]}
    assert secret_mode_problems(spec, container), "0440 without fsGroup must be refused"
    spec["securityContext"]["fsGroup"] = 10001
    assert not secret_mode_problems(spec, container), "0440 with fsGroup 10001 is readable"


def check_workloads(docs, where, experts_expected, known, problems):
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    shards = {}
    for w in workloads:
        spec = w["spec"]["template"]["spec"]
        for c in spec["containers"]:
            image = c.get("image", "")
            if "moemesh" not in image.split("/")[-1]:
                continue
            here = f"{where} {name_of(w)}"
            role = (c.get("args") or [""])[0]
            if role not in ROLES:
                problems.add(here, f"args[0] {role!r} is not a role ({', '.join(ROLES)})")
                continue
            env = {}
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef", {}).get("name")
                if ref not in configmaps:
                    problems.add(here, f"envFrom ConfigMap {ref!r} is not in the rendered output")
                    continue
                env.update(configmaps[ref])
            defined = set()
            for e in c.get("env", []):
                for ref in re.findall(r"\$\(([A-Za-z0-9_]+)\)", str(e.get("value", ""))):
                    if ref not in defined:
                        problems.add(here, f"{e['name']} uses $({ref}), which is not defined before it (Kubernetes would leave it unexpanded)")
                defined.add(e["name"])
                env[e["name"]] = e.get("value")
            ports = {p["containerPort"] for p in c.get("ports", [])}
            probes = []
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    problems.add(here, f"no {kind}")
                elif "grpc" in probe:
                    probes.append((kind, probe["grpc"]["port"]))
                elif exec_probe_port(probe.get("exec", {}).get("command")) is not None:
                    probes.append((kind, exec_probe_port(probe["exec"]["command"])))
                else:
                    problems.add(here, f"{kind} is neither a gRPC probe nor `moemesh health`")
            check_container(here, role, env, ports, probes, known, problems)
            for p in secret_mode_problems(spec, c):
                problems.add(here, p)
            grace = spec.get("terminationGracePeriodSeconds", 30)
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            sleep = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
            drain = int(env.get("MOEMESH_DRAIN_TIMEOUT") or 10)
            if grace < sleep + drain + 5:
                problems.add(here, f"terminationGracePeriodSeconds {grace} < preStop {sleep} s + drain {drain} s + 5 s to exit")
            live = c.get("livenessProbe") or {}
            if live.get("periodSeconds", 10) * live.get("failureThreshold", 3) <= grace:
                problems.add(here, "livenessProbe period × failureThreshold must outlast the grace period: a draining pod is NOT_SERVING")
            gpus = str(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", "0"))
            device = env.get("MOEMESH_DEVICE", "cpu")
            if device.startswith("cuda") and gpus != "1":
                problems.add(here, f"MOEMESH_DEVICE {device} but nvidia.com/gpu limit {gpus} (want 1 per pod)")
            if device == "cpu" and gpus != "0":
                problems.add(here, f"runs on CPU but asks for {gpus} GPU(s)")
            if role == "expert":
                shards[name_of(w)] = parse_range(env.get("MOEMESH_EXPERTS", f"0-{experts_expected - 1}"))
    seen = sorted(e for ids in shards.values() for e in ids)
    if seen != list(range(experts_expected)):
        problems.add(where, f"expert shards {shards} must cover experts 0-{experts_expected - 1} exactly once")

    def selects(selector, labels):
        return bool(selector) and all(labels.get(k) == v for k, v in selector.items())

    pod_labels = [w["spec"]["template"]["metadata"].get("labels", {}) for w in workloads]
    services = [d for d in docs if d["kind"] == "Service"]
    for d in docs:
        sel = None
        if d["kind"] == "Service":
            sel = d["spec"].get("selector")
        elif d["kind"] == "PodDisruptionBudget":
            sel = d["spec"]["selector"].get("matchLabels")
        if sel is not None and not any(selects(sel, l) for l in pod_labels):
            problems.add(f"{where} {name_of(d)}", f"selector {sel} selects no pod")
        if d["kind"] == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            if not any(w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"] for w in workloads):
                problems.add(f"{where} {name_of(d)}", f"scaleTargetRef {ref['kind']}/{ref['name']} does not exist")
        if d["kind"] == "ServiceMonitor":
            chosen = [s for s in services if selects(d["spec"]["selector"].get("matchLabels", {}), s["metadata"].get("labels", {}))]
            if not chosen:
                problems.add(f"{where} {name_of(d)}", "selects no Service")
            for ep in d["spec"]["endpoints"]:
                for s in chosen:
                    if ep["port"] not in {p.get("name") for p in s["spec"]["ports"]}:
                        problems.add(f"{where} {name_of(d)}", f"{name_of(s)} has no port named {ep['port']!r}")


def check_compose(known, problems):
    schema = yaml.safe_load((DEPLOY / "compose" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    checked = []
    for path in sorted((DEPLOY / "compose").glob("compose*.yaml")):
        where = str(path.relative_to(DEPLOY))
        doc = yaml.safe_load(path.read_text())
        for err in validator.iter_errors(doc):
            problems.add(where, f"{'/'.join(str(p) for p in err.absolute_path)}: {err.message}")
        if path.name != "compose.yaml":
            checked.append(where)
            continue
        experts = []
        for name, svc in doc["services"].items():
            role = (svc.get("command") or [""])[0]
            if role not in ROLES:
                continue
            env = {k: str(v) for k, v in svc.get("environment", {}).items()}
            ports = {port_of(env.get("MOEMESH_LISTEN", ":0"))}
            if "MOEMESH_METRICS_LISTEN" in env:
                ports.add(port_of(env["MOEMESH_METRICS_LISTEN"]))
            test = svc.get("healthcheck", {}).get("test", [])
            probe = exec_probe_port(test[1:])
            if probe is None:
                problems.add(f"{where} {name}", "healthcheck is not `moemesh health --addr ...`")
            check_container(f"{where} {name}", role, env, ports, [("healthcheck", probe)] if probe else [], known, problems)
            if role == "expert":
                default = re.fullmatch(r"\$\{\w+:-([0-9,-]+)\}", env.get("MOEMESH_EXPERTS", ""))
                experts.extend(parse_range(default.group(1)) if default else [])
        if sorted(experts) != list(range(16)):
            problems.add(where, "the default expert ranges must cover the embedded model's 16 experts once")
        checked.append(where)
    return checked


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moemesh", required=True, help="the moemesh binary whose flags the manifests must use")
    args = ap.parse_args()
    self_test()
    known = role_env(args.moemesh)
    exported = exported_metrics()
    crds = crd_validators()
    problems = Problems()
    render = renderer()
    if render is None:
        print("*** kustomize and kubectl are not installed: overlays NOT rendered; checking k8s/base's files alone ***")
        docs = [
            d
            for p in sorted((K8S / "base").glob("*.yaml"))
            if p.name != "kustomization.yaml"
            for d in yaml.safe_load_all(p.read_text())
            if d
        ]
        validate_schemas(docs, "k8s/base (unrendered)", crds, problems)
    else:
        for kustomization, experts in RENDER.items():
            where = f"k8s/{kustomization}"
            out = subprocess.run(render + [str(K8S / kustomization)], capture_output=True, text=True)
            if out.returncode != 0:
                problems.add(where, f"{' '.join(render)} failed: {out.stderr.strip()}")
                continue
            docs = [d for d in yaml.safe_load_all(out.stdout) if d]
            before = len(problems.items)
            validate_schemas(docs, where, crds, problems)
            check_workloads(docs, where, experts, known, problems)
            check_scaling(docs, where, exported, problems)
            kinds = sorted({d["kind"] for d in docs})
            status = "ok  " if len(problems.items) == before else "FAIL"
            print(f"{status} {where}: {len(docs)} objects ({', '.join(kinds)}), rendered by {' '.join(render)}, "
                  f"schemas of Kubernetes {' and '.join(VERSIONS)} (strict)")
    for where in check_compose(known, problems):
        print(f"checked {where} against the Compose Specification schema")
    for p in problems.items:
        print(f"FAIL {p}")
    print(f"deploy/validate.py: {len(problems.items)} problem(s)")
    return 1 if problems.items else 0


if __name__ == "__main__":
    sys.exit(main())
