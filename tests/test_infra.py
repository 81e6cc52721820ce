"""Offline checks of infra/ (KubeRay manifests, Ray cluster launcher config, Dockerfile).

Where every schema comes from (also named in each assertion message):

- KubeRay objects (RayCluster, RayJob, RayCronJob; ray.io/v1): the CustomResourceDefinitions in
  ``tests/schemas/kuberay/`` (KubeRay repository, ray-operator/config/crd/bases, commit
  feeaf72, v1.7.0 line, Apache-2.0; see tests/schemas/README.md). The served version's
  ``openAPIV3Schema`` is used with jsonschema's Draft 4 validator (OpenAPI 3.0 schemas are a
  Draft 4/5 dialect; ``x-kubernetes-*`` extensions and CEL rules are not evaluated). Every object
  schema that lists ``properties`` is made closed (``additionalProperties: false``, unless it
  says ``x-kubernetes-preserve-unknown-fields``): the API server would silently prune an unknown
  field, and ``kubectl apply`` (strict field validation, the default) rejects it, so a typo such
  as ``resource:`` for ``resources:`` must fail here too. The operator's own checks on top of the
  schema (KubeRay ray-operator/controllers/ray/utils/validation.go) are ported in
  ``_kuberay_operator_problems``.
- Core Kubernetes objects (CronJob, ServiceAccount, Role, RoleBinding, ConfigMap) and the pod
  templates inside the Ray objects: the Kubernetes JSON schemas shipped inside the PyPI package
  ``kubernetes-validate`` (its ``kubernetes-json-schema/v<K8S>-local-strict`` directories),
  for each version in ``K8S_VERSIONS``, strict (unknown fields rejected).
- infra/aws/cluster.yaml: Ray's own cluster-config schema ``ray/autoscaler/ray-schema.json`` from
  the installed ``ray`` package, then Ray's ``prepare_config`` + ``validate_config`` (what
  ``ray up`` runs before it talks to AWS).

CLI commands (``expo-ray ...``) found anywhere in infra/ are parsed with the real click command
``expo_ray.cli.main`` (no invocation).
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
KUBERAY_SCHEMAS = REPO / "tests" / "schemas" / "kuberay"
KUBERAY_SCHEMA_SOURCE = "KubeRay CRD tests/schemas/kuberay (v1.7.0 line, commit feeaf72)"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayCronJob": "ray.io_raycronjobs.yaml"}
K8S_VERSIONS = ("1.30.0", "1.34.0")
EXPECTED_FILES = [
    "README.md",
    "docker/Dockerfile",
    "aws/cluster.yaml",
    "kuberay/serviceaccount.yaml",
    "kuberay/sweep-spec.yaml",
    "kuberay/raycluster.yaml",
    "kuberay/rayjob-sweep.yaml",
    "kuberay/raycronjob-sweep.yaml",
    "kuberay/cronjob-sweep.yaml",
]
AWS_CREDENTIAL_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml_all(text: str) -> list:
    return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]


# --------------------------------------------------------------------------- the documents


@dataclass(frozen=True)
class Doc:
    path: Path
    where: str          # "doc 2" or "doc 3 data[rayjob.yaml]"
    obj: dict

    @property
    def kind(self) -> str:
        return self.obj.get("kind", "")

    @property
    def label(self) -> str:
        name = self.obj.get("metadata", {}).get("name") or self.obj.get("metadata", {}).get("generateName", "?")
        return f"{self.path.relative_to(REPO)} {self.where} {self.kind}/{name}"


def _yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


@functools.lru_cache(maxsize=None)
def _documents() -> tuple[Doc, ...]:
    """Every Kubernetes object under infra/kuberay, including objects embedded as YAML in a
    ConfigMap's data (the CronJob's RayJob template)."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for i, obj in enumerate(_load_yaml_all(path.read_text())):
            assert isinstance(obj, dict) and "apiVersion" in obj and "kind" in obj, \
                f"{path.relative_to(REPO)} doc {i}: not a Kubernetes object"
            docs.append(Doc(path, f"doc {i}", obj))
            if obj["kind"] == "ConfigMap":
                for key, value in (obj.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        for j, inner in enumerate(_load_yaml_all(value)):
                            if isinstance(inner, dict) and "apiVersion" in inner and "kind" in inner:
                                docs.append(Doc(path, f"doc {i} data[{key}] doc {j}", inner))
    return tuple(docs)


def _docs(*kinds: str) -> list[Doc]:
    return [d for d in _documents() if d.kind in kinds]


def _ids(docs):
    return [d.label for d in docs]


def _ray_docs() -> list[Doc]:
    return [d for d in _documents() if d.obj["apiVersion"].startswith("ray.io/")]


def _core_docs() -> list[Doc]:
    return [d for d in _documents() if not d.obj["apiVersion"].startswith("ray.io/")]


def _cluster_spec(doc: Doc) -> dict | None:
    spec = doc.obj.get("spec", {})
    if doc.kind == "RayCluster":
        return spec
    if doc.kind == "RayJob":
        return spec.get("rayClusterSpec")
    if doc.kind == "RayCronJob":
        return spec.get("jobTemplate", {}).get("rayClusterSpec")
    return None


def _rayjob_spec(doc: Doc) -> dict | None:
    if doc.kind == "RayJob":
        return doc.obj.get("spec")
    if doc.kind == "RayCronJob":
        return doc.obj.get("spec", {}).get("jobTemplate")
    return None


def _pod_templates(cluster_spec: dict) -> list[tuple[str, dict]]:
    out = [("head", cluster_spec["headGroupSpec"]["template"])]
    out += [(g["groupName"], g["template"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return out


def _ray_containers(cluster_spec: dict):
    for group, template in _pod_templates(cluster_spec):
        for container in template["spec"]["containers"]:
            yield group, template, container


def _group(cluster_spec: dict, name: str) -> dict:
    groups = {g["groupName"]: g for g in cluster_spec.get("workerGroupSpecs", [])}
    assert name in groups, f"no worker group {name!r} (groups: {sorted(groups)})"
    return groups[name]


def _the(kind: str, path: str) -> Doc:
    found = [d for d in _docs(kind) if d.path == INFRA / path and "data[" not in d.where]
    assert len(found) == 1, f"expected one {kind} in infra/{path}, found {len(found)}"
    return found[0]


# --------------------------------------------------------------------------- parsing


def test_expected_files_exist():
    missing = [f for f in EXPECTED_FILES if not (INFRA / f).is_file()]
    assert not missing, f"missing under infra/: {missing}"


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_yaml_document_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert [d for d in docs if d is not None], f"{path.relative_to(REPO)}: no YAML document"
    # Strings that are themselves YAML (ConfigMap payloads) must parse too.
    for doc in docs:
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
            for key, value in (doc.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")):
                    assert list(yaml.safe_load_all(value)), f"{path.relative_to(REPO)} data[{key}]: empty"


# --------------------------------------------------------------------------- KubeRay CRD schemas


def _closed(schema):
    """The schema with every object that lists `properties` closed to other keys (what strict
    field validation does), except where the CRD preserves unknown fields."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if isinstance(out.get(key), list):
            out[key] = [_closed(s) for s in out[key]]
    return out


@functools.lru_cache(maxsize=None)
def _crd_validator(kind: str, version: str) -> jsonschema.Draft4Validator:
    path = KUBERAY_SCHEMAS / CRD_FILES[kind]
    if not path.is_file():
        pytest.fail(f"{path} is missing: the KubeRay CRDs live in tests/schemas/kuberay")
    crd = yaml.load(path.read_text(), Loader=_Loader)
    assert crd["spec"]["names"]["kind"] == kind, f"{path}: CRD for {crd['spec']['names']['kind']}, not {kind}"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {version} is not served by {path.name} (served: {sorted(served)})"
    schema = _closed(served[version]["schema"]["openAPIV3Schema"])
    return jsonschema.Draft4Validator(schema)


def _crd_errors(obj: dict) -> list[str]:
    group, version = obj["apiVersion"].split("/")
    assert group == "ray.io", obj["apiVersion"]
    validator = _crd_validator(obj["kind"], version)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def test_kuberay_objects_present():
    kinds = sorted({d.kind for d in _ray_docs()})
    assert kinds == ["RayCluster", "RayCronJob", "RayJob"], kinds


@pytest.mark.parametrize("doc", _ray_docs(), ids=_ids(_ray_docs()))
def test_kuberay_object_matches_crd_schema(doc):
    errors = _crd_errors(doc.obj)
    assert not errors, (f"{doc.label} against {KUBERAY_SCHEMA_SOURCE} ({doc.obj['apiVersion']}):\n  "
                        + "\n  ".join(errors))


def test_crd_check_rejects_typos_and_wrong_types():
    """The CRD check is not vacuous: a misspelled field and a wrong type both fail."""
    cluster = copy.deepcopy(_the("RayCluster", "kuberay/raycluster.yaml").obj)
    container = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["resource"] = container.pop("resources")
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "sixteen"
    errors = "\n".join(_crd_errors(cluster))
    assert "'resource' was unexpected" in errors, errors
    assert "maxReplicas: 'sixteen' is not of type 'integer'" in errors, errors


# --------------------------------------------------------------------------- KubeRay operator checks

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_MAX_NAME = {"RayCluster": 53, "RayJob": 47}   # MaxRayClusterNameLength, MaxRayJobNameLength
_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_CRON_NAMES = [{}, {}, {},
               {m: i + 1 for i, m in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split())},
               {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}]


def _cron_problems(schedule: str) -> list[str]:
    """A standard 5-field cron expression (or @descriptor), as robfig/cron ParseStandard and the
    Kubernetes CronJob controller accept it."""
    if schedule.startswith("@"):
        ok = schedule in ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
        return [] if ok else [f"unknown cron descriptor {schedule!r}"]
    fields = schedule.split()
    if len(fields) != 5:
        return [f"cron schedule {schedule!r} has {len(fields)} fields, expected 5"]
    problems = []
    for field, (lo, hi), names in zip(fields, _CRON_RANGES, _CRON_NAMES):
        for part in field.split(","):
            m = re.fullmatch(r"(\*|\?|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/([0-9]+))?", part.lower())
            if not m:
                problems.append(f"cron field {field!r}: cannot parse {part!r}")
                continue
            if m.group(1) in ("*", "?"):
                continue
            for value in m.group(1).split("-"):
                number = names.get(value, int(value) if value.isdigit() else None)
                if number is None or not lo <= number <= hi:
                    problems.append(f"cron field {field!r}: {value!r} outside {lo}-{hi}")
    return problems


def _cluster_spec_problems(spec: dict) -> list[str]:
    """ValidateRayClusterSpec (KubeRay validation.go), the parts that apply to a manifest."""
    problems = []
    groups = [("Head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    for name, group in groups:
        if not group["template"]["spec"].get("containers"):
            problems.append(f"{name} group has no container")
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            problems.append(f"{name}: resources set in both rayStartParams and resources")
        if "labels" in params:
            problems.append(f"{name}: rayStartParams['labels'] is not supported; use the group's labels field")
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    if autoscaling:
        for name, group in groups[1:]:
            if group.get("suspend"):
                problems.append(f"worker group {name} cannot be suspended with the autoscaler enabled")
        if (spec.get("autoscalerOptions") or {}).get("version") == "v2":
            for name, group in groups:
                policy = group["template"]["spec"].get("restartPolicy")
                if policy not in (None, "", "Never"):
                    problems.append(f"{name}: restartPolicy must be Never or unset with autoscaler v2")
    if (spec.get("authOptions") or {}).get("mode") == "token":
        version = spec.get("rayVersion", "")
        parts = tuple(int(x) for x in re.findall(r"\d+", version)[:3])
        if not version or parts < (2, 52, 0):
            problems.append(f"authOptions.mode token needs rayVersion >= 2.52.0, got {version!r}")
    return problems


def _rayjob_spec_problems(spec: dict) -> list[str]:
    """ValidateRayJobSpec (KubeRay validation.go), the parts that apply to a manifest."""
    problems = []
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if spec.get("suspend") and not shutdown:
        problems.append("suspend needs shutdownAfterJobFinishes")
    if ttl < 0:
        problems.append("ttlSecondsAfterFinished must be >= 0")
    if not shutdown and ttl > 0:
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes")
    if spec.get("deletionRules") or (spec.get("deletionStrategy") or {}).get("deletionRules"):
        if shutdown:
            problems.append("shutdownAfterJobFinishes and deletionStrategy.deletionRules are mutually exclusive")
    selector = spec.get("clusterSelector") or {}
    if spec.get("rayClusterSpec") is None and not selector:
        problems.append("one of rayClusterSpec or clusterSelector must be set")
    if selector and not selector.get("ray.io/cluster"):
        problems.append("clusterSelector needs ray.io/cluster")
    if spec.get("submissionMode") == "InteractiveMode" and (spec.get("backoffLimit") or 0) > 0:
        problems.append("backoffLimit is incompatible with InteractiveMode")
    if "runtimeEnvYAML" in spec:
        try:
            yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as exc:
            problems.append(f"runtimeEnvYAML is not YAML: {exc}")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        problems.append("activeDeadlineSeconds must be > 0")
    if spec.get("backoffLimit", 0) < 0:
        problems.append("backoffLimit must be >= 0")
    if spec.get("rayClusterSpec") is not None:
        problems += _cluster_spec_problems(spec["rayClusterSpec"])
    return problems


def _kuberay_operator_problems(doc: Doc) -> list[str]:
    problems = []
    meta = doc.obj.get("metadata", {})
    name = meta.get("name") or (meta.get("generateName", "") + "x" * 5)
    if doc.kind in _MAX_NAME:
        if len(name) > _MAX_NAME[doc.kind]:
            problems.append(f"name {name!r} longer than {_MAX_NAME[doc.kind]}")
        if not _DNS1035.match(name):
            problems.append(f"name {name!r} is not a DNS-1035 label")
    if doc.kind == "RayCluster":
        problems += _cluster_spec_problems(doc.obj["spec"])
    elif doc.kind == "RayJob":
        problems += _rayjob_spec_problems(doc.obj["spec"])
    elif doc.kind == "RayCronJob":
        problems += _cron_problems(doc.obj["spec"]["schedule"])
        problems += _rayjob_spec_problems(doc.obj["spec"]["jobTemplate"])
    return problems


@pytest.mark.parametrize("doc", _ray_docs(), ids=_ids(_ray_docs()))
def test_kuberay_object_passes_operator_validation(doc):
    problems = _kuberay_operator_problems(doc)
    assert not problems, (f"{doc.label}: KubeRay would reject it (checks ported from "
                          f"ray-operator/controllers/ray/utils/validation.go): {problems}")


def test_operator_checks_reject_what_kuberay_rejects():
    """The ported checks are not vacuous."""
    job = copy.deepcopy(_the("RayJob", "kuberay/rayjob-sweep.yaml").obj["spec"])
    job["shutdownAfterJobFinishes"] = False
    job["activeDeadlineSeconds"] = 0
    job["rayClusterSpec"]["headGroupSpec"]["resources"] = {"CPU": "0"}
    job["rayClusterSpec"]["rayVersion"] = "2.50.0"
    problems = " | ".join(_rayjob_spec_problems(job))
    for expected in ("ttlSecondsAfterFinished needs shutdownAfterJobFinishes", "activeDeadlineSeconds must be > 0",
                     "Head: resources set in both", "needs rayVersion >= 2.52.0"):
        assert expected in problems, problems
    assert _cron_problems("0 2 * *") and _cron_problems("0 25 * * 6") and _cron_problems("0 2 * * funday")
    assert not _cron_problems("*/15 0-6 1,15 jan-jun mon-fri") and not _cron_problems("@weekly")


# --------------------------------------------------------------------------- core Kubernetes schemas


def _k8s_validate():
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate (PyPI; ships the Kubernetes JSON schemas) is not installed: "
               "pip install kubernetes-validate==1.37.0")
    from kubernetes_validate.version import __version__

    return kv, __version__


def _k8s_errors(obj: dict, k8s_version: str) -> str | None:
    kv, kv_version = _k8s_validate()
    source = f"kubernetes-validate {kv_version}, Kubernetes {k8s_version} JSON schema (strict)"
    try:
        kv.validate(obj, k8s_version, strict=True)
    except kv.ValidationError as exc:
        return f"{source}: {'/'.join(map(str, exc.path)) or '<root>'}: {exc.message}"
    except kv.SchemaNotFoundError as exc:
        return f"{source}: {exc.message}"
    return None


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", _core_docs(), ids=_ids(_core_docs()))
def test_core_object_matches_kubernetes_schema(doc, k8s_version):
    error = _k8s_errors(doc.obj, k8s_version)
    assert error is None, f"{doc.label}: {error}"


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", _ray_docs(), ids=_ids(_ray_docs()))
def test_ray_pod_templates_match_kubernetes_schema(doc, k8s_version):
    """The CRDs embed PodTemplateSpec; validating each template as a core v1 PodTemplate with the
    strict Kubernetes schema also catches misspelled pod/container fields."""
    errors = []
    for group, template in _pod_templates(_cluster_spec(doc)):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
        error = _k8s_errors(wrapped, k8s_version)
        if error:
            errors.append(f"{group}: {error}")
    assert not errors, f"{doc.label}: " + "\n".join(errors)


def test_kubernetes_schema_check_rejects_typos():
    cronjob = copy.deepcopy(_the("CronJob", "kuberay/cronjob-sweep.yaml").obj)
    cronjob["spec"]["concurencyPolicy"] = cronjob["spec"].pop("concurrencyPolicy")
    error = _k8s_errors(cronjob, K8S_VERSIONS[-1])
    assert error and "concurencyPolicy" in error, error


def test_core_kinds_present():
    kinds = sorted({d.kind for d in _core_docs()})
    assert kinds == ["ConfigMap", "CronJob", "Role", "RoleBinding", "ServiceAccount"], kinds


# --------------------------------------------------------------------------- design rules (KubeRay)


def _cluster_docs():
    return [d for d in _ray_docs() if _cluster_spec(d) is not None]


def test_cluster_specs_are_identical():
    """rayjob-sweep, raycronjob-sweep and the CronJob's RayJob template embed raycluster.yaml's spec
    verbatim; the RayJob specs of the three sweep variants are identical too."""
    reference = _the("RayCluster", "kuberay/raycluster.yaml").obj["spec"]
    differ = [d.label for d in _cluster_docs() if _cluster_spec(d) != reference]
    assert not differ, f"rayClusterSpec differs from infra/kuberay/raycluster.yaml in: {differ}"
    job_specs = [(d.label, _rayjob_spec(d)) for d in _ray_docs() if _rayjob_spec(d) is not None]
    assert len(job_specs) == 3, [label for label, _ in job_specs]
    assert all(spec == job_specs[0][1] for _, spec in job_specs), \
        f"RayJob specs differ between {[label for label, _ in job_specs]}"


def test_head_runs_no_work_and_autoscaling_is_on():
    spec = _the("RayCluster", "kuberay/raycluster.yaml").obj["spec"]
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    assert spec.get("enableInTreeAutoscaling") is True
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] < group["maxReplicas"], group["groupName"]
        assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]


def test_cpu_group_is_sized_by_memory_and_ephemeral_storage():
    group = _group(_the("RayCluster", "kuberay/raycluster.yaml").obj["spec"], "cpu-extrapolate")
    (container,) = group["template"]["spec"]["containers"]
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory", "ephemeral-storage"):
            assert resource in container["resources"].get(part, {}), f"cpu-extrapolate: {part}.{resource} missing"
        assert "nvidia.com/gpu" not in container["resources"].get(part, {})
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"], \
        "memory request != limit: the pod could be OOM-killed or evicted under node pressure"


def _dev_shm_volume(template: dict, container: dict) -> dict | None:
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in template["spec"].get("volumes", [])}
    return volumes.get(mounts.get("/dev/shm"))


def test_gpu_group_has_8_gpus_and_memory_backed_dev_shm():
    group = _group(_the("RayCluster", "kuberay/raycluster.yaml").obj["spec"], "gpu-evaluate")
    template = group["template"]
    (container,) = template["spec"]["containers"]
    assert str(container["resources"]["limits"].get("nvidia.com/gpu")) == "8"
    assert str(container["resources"].get("requests", {}).get("nvidia.com/gpu", "8")) == "8"
    volume = _dev_shm_volume(template, container)
    assert volume is not None, "gpu-evaluate: nothing mounted at /dev/shm"
    assert volume.get("emptyDir", {}).get("medium") == "Memory", volume
    assert any(t.get("key") == "nvidia.com/gpu" for t in template["spec"].get("tolerations", [])), \
        "gpu-evaluate: no toleration for the nvidia.com/gpu taint"


@pytest.mark.parametrize("doc", _cluster_docs(), ids=_ids(_cluster_docs()))
def test_s3_credentials_are_never_inline(doc):
    sa_names = {d.obj["metadata"]["name"]: d.obj for d in _docs("ServiceAccount")}
    for group, template, container in _ray_containers(_cluster_spec(doc)):
        for env in container.get("env", []):
            if env["name"] in AWS_CREDENTIAL_NAMES:
                assert "value" not in env, f"{doc.label} {group}: {env['name']} has an inline value"
        from_secret = any("secretRef" in e for e in container.get("envFrom", [])) or any(
            "secretKeyRef" in e.get("valueFrom", {}) for e in container.get("env", []))
        sa = sa_names.get(template["spec"].get("serviceAccountName"))
        irsa = bool(sa and sa.get("metadata", {}).get("annotations", {}).get("eks.amazonaws.com/role-arn"))
        assert from_secret or irsa, f"{doc.label} {group}: no S3 credentials (Secret envFrom/secretKeyRef or IRSA)"


def test_no_secret_values_anywhere_in_infra():
    pattern = re.compile(r"AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[:=]\s*\S{20,}", re.IGNORECASE)
    hits = [f"{p.relative_to(REPO)}:{i}" for p in INFRA.rglob("*") if p.is_file()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, f"credential-looking values in {hits}"
    assert not _docs("Secret"), "no Secret objects with values belong in infra/"


def test_rayjob_is_a_bounded_one_shot():
    spec = _the("RayJob", "kuberay/rayjob-sweep.yaml").obj["spec"]
    assert spec["entrypoint"] == "expo-ray sweep /config/sweep.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["backoffLimit"] == 0


@pytest.mark.parametrize("doc", [d for d in _ray_docs() if _rayjob_spec(d) is not None],
                         ids=_ids([d for d in _ray_docs() if _rayjob_spec(d) is not None]))
def test_sweep_spec_is_mounted_where_the_entrypoint_reads_it(doc):
    """`expo-ray sweep SPEC`: SPEC is a key of the sweep-spec ConfigMap, mounted at SPEC's folder
    on the head pod (where KubeRay runs the job's driver)."""
    spec = _rayjob_spec(doc)
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["expo-ray", "sweep"], argv
    spec_path = Path(argv[2])
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]
    mounts = {m["mountPath"]: m["name"] for m in head["spec"]["containers"][0].get("volumeMounts", [])}
    assert str(spec_path.parent) in mounts, f"{doc.label}: nothing mounted at {spec_path.parent} on the head"
    volume = {v["name"]: v for v in head["spec"]["volumes"]}[mounts[str(spec_path.parent)]]
    config_maps = {d.obj["metadata"]["name"]: d.obj for d in _docs("ConfigMap")}
    config_map = config_maps.get(volume.get("configMap", {}).get("name"))
    assert config_map is not None, f"{doc.label}: {spec_path.parent} is not a ConfigMap defined in infra/"
    assert spec_path.name in config_map["data"], f"{doc.label}: ConfigMap has no key {spec_path.name}"
    assert isinstance(yaml.safe_load(config_map["data"][spec_path.name]), dict)


def test_referenced_objects_exist():
    """Every ServiceAccount, ConfigMap and Role that a manifest refers to is defined in infra/."""
    defined = {(d.kind, d.obj["metadata"]["name"]) for d in _core_docs()}
    missing = []
    for doc in _cluster_docs():
        for group, template in _pod_templates(_cluster_spec(doc)):
            sa = template["spec"].get("serviceAccountName")
            if sa and ("ServiceAccount", sa) not in defined:
                missing.append(f"{doc.label} {group}: ServiceAccount {sa}")
            for volume in template["spec"].get("volumes", []):
                cm = volume.get("configMap", {}).get("name")
                if cm and ("ConfigMap", cm) not in defined:
                    missing.append(f"{doc.label} {group}: ConfigMap {cm}")
    for doc in _docs("CronJob"):
        pod = doc.obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        if ("ServiceAccount", pod["serviceAccountName"]) not in defined:
            missing.append(f"{doc.label}: ServiceAccount {pod['serviceAccountName']}")
        for volume in pod.get("volumes", []):
            cm = volume.get("configMap", {}).get("name")
            if cm and ("ConfigMap", cm) not in defined:
                missing.append(f"{doc.label}: ConfigMap {cm}")
    for doc in _docs("RoleBinding"):
        if (doc.obj["roleRef"]["kind"], doc.obj["roleRef"]["name"]) not in defined:
            missing.append(f"{doc.label}: {doc.obj['roleRef']['kind']} {doc.obj['roleRef']['name']}")
        for subject in doc.obj["subjects"]:
            if ("ServiceAccount", subject["name"]) not in defined:
                missing.append(f"{doc.label}: subject ServiceAccount {subject['name']}")
    assert not missing, f"referenced but not defined under infra/kuberay: {missing}"


def test_cronjob_forbids_overlap_and_creates_rayjobs_with_least_privilege():
    cronjob = _the("CronJob", "kuberay/cronjob-sweep.yaml").obj
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert not _cron_problems(cronjob["spec"]["schedule"]), _cron_problems(cronjob["spec"]["schedule"])
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0, "a retried pod would create a second RayJob"
    pod = job["template"]["spec"]
    (container,) = pod["containers"]
    assert "kubectl" in container["image"].split("/")[-1], container["image"]

    # The pod's ServiceAccount may create and get rayjobs, and nothing else.
    binding = next(d.obj for d in _docs("RoleBinding")
                   if any(s["name"] == pod["serviceAccountName"] for s in d.obj["subjects"]))
    role = next(d.obj for d in _docs("Role") if d.obj["metadata"]["name"] == binding["roleRef"]["name"])
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
              for r in rule["resources"] for v in rule["verbs"]}
    assert grants == {("ray.io", "rayjobs", "create"), ("ray.io", "rayjobs", "get")}, grants

    # The script it runs uses only those verbs, and the template it creates is a RayJob whose
    # deadline ends before the CronJob's Job gives up waiting.
    template_map = next(d.obj for d in _docs("ConfigMap")
                        if any(v.get("configMap", {}).get("name") == d.obj["metadata"]["name"]
                               for v in pod["volumes"]))
    script = template_map["data"][Path(container["command"][-1]).name]
    verbs = set(re.findall(r"\bkubectl\s+([a-z]+)", script))
    assert verbs == {"create", "get"}, verbs
    assert re.search(r"kubectl get rayjob\b", script) and "/template/rayjob.yaml" in script
    (rayjob,) = _load_yaml_all(template_map["data"]["rayjob.yaml"])
    assert rayjob["kind"] == "RayJob"
    rayjob_lifetime = rayjob["spec"]["activeDeadlineSeconds"] + rayjob["spec"]["ttlSecondsAfterFinished"]
    assert job["activeDeadlineSeconds"] > rayjob_lifetime, "the waiting pod would give up before the RayJob ends"


_FAKE_KUBECTL = """#!/bin/bash
# A stand-in for kubectl: logs its arguments, names the created RayJob, and answers `get` with the
# next line of $FAKE_STATUSES (ERROR: fail like an unreachable API server).
echo "$*" >> "$FAKE_LOG"
case "$1" in
  create) printf '%s' expo-sweep-scheduled-abcde ;;
  get)
    n=$(( $(cat "$FAKE_COUNT" 2>/dev/null || echo 0) + 1 ))
    echo "$n" > "$FAKE_COUNT"
    line=$(sed -n "${n}p" "$FAKE_STATUSES")
    [ "$line" = ERROR ] && exit 1
    printf '%s' "$line" ;;
  *) exit 2 ;;
esac
"""


def _cronjob_script() -> str:
    template_map = _the("ConfigMap", "kuberay/cronjob-sweep.yaml").obj
    return template_map["data"]["create-and-wait.sh"]


def test_cronjob_script_is_valid_bash(tmp_path):
    import subprocess

    script = tmp_path / "create-and-wait.sh"
    script.write_text(_cronjob_script())
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("statuses, exit_code", [
    (["", "Initializing", "Running", "Complete"], 0),
    (["Running", "ERROR", "ERROR", "ERROR", "Running", "Complete"], 0),
    (["Running", "Failed", "DeadlineExceeded: past activeDeadlineSeconds"], 1),
    (["ERROR"] * 10, 1),
], ids=["complete", "transient-api-errors", "failed", "rayjob-gone"])
def test_cronjob_script_waits_for_the_rayjob(tmp_path, statuses, exit_code):
    """The CronJob's script (run by bash with a fake kubectl and sleep) creates exactly one RayJob
    and exits only when it is Complete (0) or Failed (1), or its status stays unreadable (1)."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(_FAKE_KUBECTL)
    (bin_dir / "sleep").write_text("#!/bin/bash\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "statuses").write_text("\n".join(statuses) + "\n")
    script = tmp_path / "create-and-wait.sh"
    script.write_text(_cronjob_script())
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log"),
               FAKE_COUNT=str(tmp_path / "count"), FAKE_STATUSES=str(tmp_path / "statuses"))
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == exit_code, result.stdout + result.stderr
    calls = (tmp_path / "log").read_text().splitlines()
    assert calls[0] == "create -f /template/rayjob.yaml -o jsonpath={.metadata.name}", calls
    assert sum(c.startswith("create") for c in calls) == 1, calls
    assert all(c.startswith("get rayjob expo-sweep-scheduled-abcde ") for c in calls[1:]), calls


def test_raycronjob_runs_cannot_overlap_a_weekly_schedule():
    """RayCronJob has no concurrency policy: the run's deadline must be shorter than the period."""
    cron = _the("RayCronJob", "kuberay/raycronjob-sweep.yaml").obj["spec"]
    minute, hour, dom, month, dow = cron["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and dom == "*" and month == "*" and dow.isdigit(), \
        f"update this check for schedule {cron['schedule']!r}"
    assert cron["jobTemplate"]["activeDeadlineSeconds"] < 7 * 24 * 3600


# --------------------------------------------------------------------------- images and versions


def _project_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:
        m = re.search(r'^\[project\][^\[]*?^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE | re.DOTALL)
        assert m, "pyproject.toml: no [project] version"
        return m.group(1)
    return tomllib.loads(text)["project"]["version"]


def _dockerfile_bases() -> list[str]:
    text = (INFRA / "docker" / "Dockerfile").read_text()
    return re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE)


def test_dockerfile_pins_a_ray_llm_base_and_installs_the_repository():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    bases = _dockerfile_bases()
    assert bases, "no FROM"
    for base in bases:
        image = base.split("@")[0]
        assert image.startswith("rayproject/ray-llm:"), base
        tag = image.split(":", 1)[1]
        assert re.match(r"^\d+\.\d+\.\d+-py3\d+-(cu\d+|gpu)$", tag), f"{base}: not a pinned version tag"
    assert len({b for b in bases}) == 1, f"build and runtime stages use different bases: {bases}"
    assert re.search(r"^COPY\s+(--\S+\s+)*\.\s+/src\s*$", text, flags=re.MULTILINE), "COPY . /src missing"
    assert "pip wheel" in text and "/src" in text and "pip install" in text
    assert "--constraint" in text, "base image packages are not pinned"


def test_one_image_and_one_ray_version_everywhere():
    ray_version = _dockerfile_bases()[0].split(":", 1)[1].split("-")[0]
    image_tag = f"expo-ray:{_project_version()}"
    images = set()
    for doc in _cluster_docs():
        spec = _cluster_spec(doc)
        assert spec["rayVersion"] == ray_version, \
            f"{doc.label}: rayVersion {spec['rayVersion']} != Dockerfile base Ray {ray_version}"
        images |= {c["image"] for _, _, c in _ray_containers(spec)}
    aws = yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())
    images.add(aws["docker"]["image"])
    assert len(images) == 1, f"different images: {sorted(images)}"
    (image,) = images
    assert image.endswith("/" + image_tag), f"{image}: tag should be the project version ({image_tag})"


# --------------------------------------------------------------------------- AWS launcher config


@functools.lru_cache(maxsize=None)
def _aws_config() -> dict:
    return yaml.safe_load((INFRA / "aws" / "cluster.yaml").read_text())


def _ray_schema_source() -> tuple[dict, str]:
    import ray
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text()), f"ray {ray.__version__} {path.relative_to(Path(ray.__file__).parents[1])}"


def test_aws_config_matches_ray_schema():
    schema, source = _ray_schema_source()
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in validator.iter_errors(_aws_config())]
    assert not errors, f"infra/aws/cluster.yaml against {source}:\n  " + "\n  ".join(errors)


def test_ray_schema_check_rejects_unknown_keys():
    schema, source = _ray_schema_source()
    broken = copy.deepcopy(_aws_config())
    broken["available_node_types"]["ray.worker.cpu"]["min_worker"] = 1
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken)), f"{source} accepted min_worker"


def test_aws_config_passes_ray_prepare_and_validate():
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(_aws_config()))
    validate_config(prepared)
    # Setup stays minimal: the image carries everything (Ray's defaults would pip-install Ray).
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert not any("pip install" in c for c in prepared.get(key, [])), f"{key}: {prepared.get(key)}"


def test_aws_node_types():
    config = _aws_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "work would be scheduled on the head"
    by_instance = {}
    for name, node in types.items():
        node_config = node["node_config"]
        assert "IamInstanceProfile" in node_config, f"{name}: no instance profile for S3"
        by_instance.setdefault(node_config["InstanceType"], []).append((name, node))
    assert {"p4de.24xlarge", "p5.48xlarge"} <= set(by_instance), sorted(by_instance)
    for instance in ("p4de.24xlarge", "p5.48xlarge"):
        on_demand = [n for n, node in by_instance[instance] if "InstanceMarketOptions" not in node["node_config"]]
        assert on_demand, f"{instance}: no on-demand node type"
    cpu_workers = [(n, node) for n, node in types.items() if n != config["head_node_type"]
                   and node["node_config"]["InstanceType"].split(".")[0][:2] in ("m6", "r6", "m7", "r7", "c6", "c7")]
    assert cpu_workers, "no CPU worker type"
    for name, node in cpu_workers:
        assert node["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot", name
        sizes = [m["Ebs"]["VolumeSize"] for m in node["node_config"].get("BlockDeviceMappings", [])]
        assert sizes and max(sizes) >= 200, f"{name}: EBS {sizes} GiB"
    assert config["docker"]["image"], "no docker image"


# --------------------------------------------------------------------------- CLI commands

# `expo-ray ...` where a command can start: after `ray job submit ... --`, as a YAML value
# (`entrypoint: expo-ray ...`), after `&&`/`;`, or at the start of a line that holds a command
# (code, a Markdown code block, or an indented example in a comment; not comment prose).
_EXPO_RAY_AFTER = re.compile(r"(?:\s--\s+|:\s+|&&\s*|;\s*)expo-ray\s+(?=\S)(.*)$")
_EXPO_RAY_START = re.compile(r"^expo-ray\s+(?=\S)(.*)$")


def _logical_lines(path: Path):
    """(line number, text, may a command start the line) with shell continuations joined and
    comment markers removed; for Markdown only the fenced code blocks."""
    lines = path.read_text().splitlines()
    if path.suffix == ".md":
        inside, kept = False, []
        for i, line in enumerate(lines, 1):
            if line.lstrip().startswith("```"):
                inside = not inside
                kept.append((i, ""))
            else:
                kept.append((i, line if inside else ""))
    else:
        kept = list(enumerate(lines, 1))
    pending, start, start_ok = "", 0, True
    for i, line in kept:
        comment = re.match(r"^\s*#+( *)", line)
        text = line[comment.end():].strip() if comment else line.strip()
        if not pending:
            start = i
            # In comments, commands are indented examples ("#   expo-ray ..."), prose is not.
            start_ok = comment is None or len(comment.group(1)) >= 2
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        yield start, pending + text, start_ok
        pending = ""
    if pending:
        yield start, pending, start_ok


# Where users read commands: the cluster files, the job scripts, the README and the docs.
COMMAND_FILES = (sorted(p for p in INFRA.rglob("*") if p.is_file()) + sorted((REPO / "jobs").rglob("*.sh"))
                 + [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md")))


def _cli_commands() -> list[tuple[str, list[str]]]:
    found = {}
    for path in COMMAND_FILES:
        for line_no, text, start_ok in _logical_lines(path):
            m = _EXPO_RAY_AFTER.search(text) or (_EXPO_RAY_START.match(text) if start_ok else None)
            if not m:
                continue
            # The command ends at a comment, a closing backtick or a shell operator.
            rest = m.group(1).split(" #")[0].split("`")[0]
            lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            argv = []
            for token in lexer:
                if token and set(token) <= set("&|;()<>"):
                    break
                argv.append(token)
            if any("[" in a or a in ("...", "…") for a in argv):  # a synopsis (`[options]`), not a command
                continue
            found.setdefault((str(path.relative_to(REPO)), tuple(argv)), line_no)
    return [(f"{where}:{line_no}", list(argv)) for (where, argv), line_no in found.items()]


def _cli_params():
    return [pytest.param(argv, id=f"{where} expo-ray {' '.join(argv)[:60]}") for where, argv in _cli_commands()]


def test_cli_commands_found():
    subcommands = {next((a for a in argv if not a.startswith("-")), None) for _, argv in _cli_commands()}
    assert {"sweep", "extrapolate"} <= subcommands, subcommands


@pytest.mark.parametrize("argv", _cli_params())
def test_cli_command_parses(argv):
    import click

    from expo_ray.cli import main

    try:
        ctx = main.make_context("expo-ray", list(argv))
    except click.exceptions.Exit as exc:     # --version / --help: parsed, and would exit cleanly
        assert exc.exit_code == 0
        return
    group_options = [a for a in argv[: next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))]]
    name, *rest = argv[len(group_options):]
    command = main.get_command(ctx, name)
    assert command is not None, f"expo-ray has no command {name!r} (has: {sorted(main.commands)})"
    with ctx:
        sub = command.make_context(name, list(rest), parent=ctx)
    assert sub.command is command


def test_cli_check_rejects_bad_options():
    """The CLI check is not vacuous: an unknown option and a missing required one both fail."""
    import click

    with pytest.raises(click.exceptions.NoSuchOption):
        test_cli_command_parses(["extrapolate", "--sft", "a", "--aligned", "b", "--out", "c", "--alpah", "0.1"])
    with pytest.raises(click.exceptions.MissingParameter):
        test_cli_command_parses(["extrapolate", "--sft", "a", "--aligned", "b"])


def test_sweep_spec_configmap_is_a_valid_sweep_spec():
    """The sweep.yaml shipped in the ConfigMap parses with expo-ray's own spec parser."""
    from expo_ray.sweep.spec import parse_spec

    config_map = _the("ConfigMap", "kuberay/sweep-spec.yaml").obj
    spec = parse_spec(config_map["data"]["sweep.yaml"], "infra/kuberay/sweep-spec.yaml:sweep.yaml")
    assert spec.pairs and spec.evaluation is not None and spec.evaluation.engine.tp == 8
