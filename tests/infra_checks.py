"""The machinery behind tests/test_infra.py: parsers and validators for what infra/ holds.

- files: infra/'s YAML, pyproject.toml (requirements, the packages [tool.setuptools] maps
  into ``ldmflow`` and the folders they are built from, module -> source file);
- KubeRay: a small explicit validator written from the v1 CRD types
  (ray-operator/apis/ray/v1/*_types.go) and the operator's validation rules
  (ray-operator/controllers/ray/utils/validation.go), the Serve config inside the RayService;
- compose: services, variables, credentials;
- the Dockerfile and its dockerignore: instructions, ARGs, pip installs, COPYs, exclusions.

Nothing here is a test; nothing needs Docker, Kubernetes or the network.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import os
import re
import shlex
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
COMPOSE = INFRA / "compose.yaml"
DOCKERFILE = INFRA / "Dockerfile"
DOCKERIGNORE = INFRA / "Dockerfile.dockerignore"  # Docker's <Dockerfile>.dockerignore
ENV_EXAMPLE = INFRA / "env.example"
APP_DIR = "/app"  # where the image puts configs/ (COPY configs/ /app/configs/)

RAY_KINDS = ("RayCluster", "RayJob", "RayService")
GPU = "nvidia.com/gpu"
# Names of variables and keys that hold secrets.
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|ROOT_USER|CREDENTIAL", re.IGNORECASE)
# ${VAR}, ${VAR:?msg}, ${VAR:-default}, ... but not $${VAR} (a literal $ for compose).
COMPOSE_VAR = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)([^}]*)\}")
URL_USERINFO = re.compile(r"://([^:/@\s]+):([^@\s]*)@")


# ---- helpers: files -----------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement(name: str) -> Requirement:
    for line in pyproject()["project"]["dependencies"]:
        req = Requirement(line)
        if req.name == name:
            return req
    raise AssertionError(f"pyproject.toml does not require {name}")


def package_folder(package: str) -> str:
    """The repository folder setuptools builds ``package`` from: its own [tool.setuptools.package-dir]
    entry, else its nearest mapped parent's folder plus the rest of its name ("" maps the root)."""
    mapping = pyproject()["tool"]["setuptools"].get("package-dir", {})
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in mapping:
            return "/".join([mapping[prefix].strip("/"), *parts[i:]])
    return "/".join(part for part in [mapping.get("", "").strip("/"), *parts] if part)


def project_packages() -> dict[str, str]:
    """Installed package -> the repository folder it is built from, as [tool.setuptools] lists
    the packages and package-dir maps them ("ldmflow.serving" -> "serving")."""
    packages = pyproject()["tool"]["setuptools"]["packages"]
    assert isinstance(packages, list), "[tool.setuptools] packages should list the installed packages"
    return {package: package_folder(package) for package in packages}


def module_source(module: str) -> Path:
    """The source file of an installed module through the package-dir mapping
    (``ldmflow.serving.app`` -> serving/app.py; a package -> its __init__.py); it may not exist."""
    package, _, name = module.rpartition(".")
    if (ROOT / package_folder(module)).is_dir():
        return ROOT / package_folder(module) / "__init__.py"
    return ROOT / package_folder(package) / f"{name}.py"


# ---- helpers: KubeRay ---------------------------------------------------------------

# Spec fields of the v1 CRDs (apis/ray/v1/*_types.go). The API server prunes unknown
# fields of a structural schema silently, so a misspelt field is a config that vanishes.
CLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "managedBy", "upgradeStrategy", "authOptions",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template", "resources", "labels"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels",
}
AUTOSCALER_FIELDS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode", "version",
}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYSERVICE_SPEC_FIELDS = {
    "serveConfigV2", "rayClusterConfig", "serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold",
    "serveService", "upgradeStrategy", "excludeHeadPodFromServeSvc", "rayClusterDeletionDelaySeconds",
}
# utils/constant.go: 63 minus the longest Service suffix; RayJob/RayService names get 6 more characters.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def ray_manifests() -> list[tuple[str, dict]]:
    """(file name / resource name, document) for every KubeRay resource under infra/kuberay."""
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in load_docs(path):
            if doc.get("kind") in RAY_KINDS:
                found.append((f"{path.name}/{doc['metadata']['name']}", doc))
    return found


def manifest(kind: str) -> dict:
    docs = [doc for _, doc in ray_manifests() if doc["kind"] == kind]
    assert len(docs) == 1, f"expected one {kind} under infra/kuberay, found {len(docs)}"
    return docs[0]


def cluster_spec(doc: dict) -> dict:
    """The RayClusterSpec inside a RayCluster, RayJob or RayService (each names it differently)."""
    spec = doc.get("spec") or {}
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]
    ] or {}


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head and every worker group."""
    return [("head", spec.get("headGroupSpec") or {})] + [
        (group.get("groupName", f"workerGroupSpecs[{i}]"), group)
        for i, group in enumerate(spec.get("workerGroupSpecs") or [])
    ]


def containers(group: dict) -> list[dict]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def is_gpu_group(group: dict) -> bool:
    return "num-gpus" in (group.get("rayStartParams") or {}) or any(
        GPU in ((c.get("resources") or {}).get("limits") or {}) for c in containers(group)
    )


def validate_cluster_spec(spec: dict, where: str) -> list[str]:
    problems = []
    if not isinstance(spec.get("headGroupSpec"), dict):
        return [f"{where}: headGroupSpec is required"]
    problems += [f"{where}: unknown field {k!r}" for k in sorted(set(spec) - CLUSTER_SPEC_FIELDS)]
    if "enableInTreeAutoscaling" in spec and not isinstance(spec["enableInTreeAutoscaling"], bool):
        problems.append(f"{where}: enableInTreeAutoscaling must be a boolean")
    options = spec.get("autoscalerOptions") or {}
    problems += [f"{where}.autoscalerOptions: unknown field {k!r}" for k in sorted(set(options) - AUTOSCALER_FIELDS)]
    if options.get("upscalingMode", "Default") not in ("Default", "Aggressive", "Conservative"):
        problems.append(f"{where}.autoscalerOptions.upscalingMode: {options['upscalingMode']!r} is not an allowed value")
    if "rayVersion" in spec and not isinstance(spec["rayVersion"], str):
        problems.append(f"{where}: rayVersion must be a string (quote it)")

    names = [name for name, _ in groups(spec)[1:]]
    if len(names) != len(set(names)):
        problems.append(f"{where}: worker group names repeat: {names}")
    for name, group in groups(spec):
        at = f"{where}.{'headGroupSpec' if name == 'head' else 'workerGroupSpecs[' + name + ']'}"
        allowed = HEAD_GROUP_FIELDS if name == "head" else WORKER_GROUP_FIELDS
        problems += [f"{at}: unknown field {k!r}" for k in sorted(set(group) - allowed)]
        params = group.get("rayStartParams")
        if not isinstance(params, dict):
            problems.append(f"{at}: rayStartParams (a map, possibly empty) is required")
        else:  # map[string]string in the CRD: an unquoted number is rejected
            problems += [f"{at}.rayStartParams[{k}]: {v!r} must be a string"
                         for k, v in params.items() if not isinstance(v, str)]
        if not isinstance(group.get("template"), dict):
            problems.append(f"{at}: template is required")
        pods = containers(group)
        if not pods:
            problems.append(f"{at}: template.spec.containers needs at least one container (the Ray container first)")
        elif not pods[0].get("image"):
            problems.append(f"{at}: containers[0].image is required")
        if name != "head":
            counts = {k: group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")}
            if not all(isinstance(v, int) and v >= 0 for v in counts.values()):
                problems.append(f"{at}: minReplicas, replicas, maxReplicas must be non-negative integers, got {counts}")
            elif not counts["minReplicas"] <= counts["replicas"] <= counts["maxReplicas"]:
                problems.append(f"{at}: needs minReplicas <= replicas <= maxReplicas, got {counts}")
        if is_gpu_group(group) and pods:
            limits = (pods[0].get("resources") or {}).get("limits") or {}
            gpus = limits.get(GPU)
            if not (isinstance(gpus, int) and gpus >= 1):
                problems.append(f"{at}: a GPU group must put {GPU} (>= 1) in the Ray container's limits")
            elif (params or {}).get("num-gpus") not in (None, str(gpus)):
                problems.append(f"{at}: rayStartParams num-gpus {params['num-gpus']!r} differs from the {GPU} limit {gpus}")
            tolerations = (group["template"].get("spec") or {}).get("tolerations") or []
            if not any(t.get("key") == GPU for t in tolerations):
                problems.append(f"{at}: a GPU group needs a toleration for the {GPU} taint")
    return problems


def validate_ray_resource(doc: dict) -> list[str]:
    """Problems that the KubeRay v1 CRDs or the operator's validation would refuse."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != "ray.io/v1":
        return [f"apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}"]
    if kind not in RAY_KINDS:
        return [f"kind must be one of {RAY_KINDS}, got {kind!r}"]
    problems = []
    name = (doc.get("metadata") or {}).get("name", "")
    if not DNS1035.match(name) or len(name) > MAX_NAME[kind]:
        problems.append(f"metadata.name {name!r}: must be a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    spec = doc.get("spec") or {}
    if kind == "RayJob":
        problems += [f"spec: unknown field {k!r}" for k in sorted(set(spec) - RAYJOB_SPEC_FIELDS)]
        if not spec.get("entrypoint"):
            problems.append("spec.entrypoint is required")
        if not isinstance(spec.get("rayClusterSpec"), dict):
            problems.append("spec.rayClusterSpec is required (no clusterSelector is used)")
        if spec.get("ttlSecondsAfterFinished", 0) < 0:
            problems.append("spec.ttlSecondsAfterFinished must be >= 0")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            problems.append("spec.ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("activeDeadlineSeconds", 1) <= 0:
            problems.append("spec.activeDeadlineSeconds must be positive")
        if spec.get("backoffLimit", 0) < 0:
            problems.append("spec.backoffLimit must be >= 0")
    if kind == "RayService":
        problems += [f"spec: unknown field {k!r}" for k in sorted(set(spec) - RAYSERVICE_SPEC_FIELDS)]
        if not isinstance(spec.get("serveConfigV2"), str):
            problems.append("spec.serveConfigV2 is required, as a YAML string")
        if not isinstance(spec.get("rayClusterConfig"), dict):
            problems.append("spec.rayClusterConfig is required")
    where = {"RayCluster": "spec", "RayJob": "spec.rayClusterSpec", "RayService": "spec.rayClusterConfig"}[kind]
    return problems + validate_cluster_spec(cluster_spec(doc), where)


# KubeRay's published CRDs (ray-operator/config/crd/bases/ray.io_*.yaml of the release), kept
# beside the checkout in shared/ or named by LDMFLOW_KUBERAY_CRDS.
KUBERAY_VERSION = "v1.7.0"


def kuberay_crd_folder() -> Path:
    return Path(os.environ.get("LDMFLOW_KUBERAY_CRDS") or ROOT.parent / "shared" / "kuberay" / KUBERAY_VERSION)


@functools.cache
def crd_schema(kind: str, folder: Path) -> dict:
    """The v1 ``openAPIV3Schema`` of KubeRay's CRD for ``kind`` as a JSON schema that applies
    the API server's strict field validation (``kubectl apply --validate=strict``): a field
    the schema does not name is refused unless the schema preserves unknown fields."""
    crd = yaml.safe_load((folder / f"ray.io_{kind.lower()}s.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == kind, crd["spec"]["names"]
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(node: dict) -> dict:
    node = dict(node)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node.pop("type", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in node:
        node["properties"] = {name: _strict(sub) for name, sub in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(node.get(key), dict):
            node[key] = _strict(node[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [_strict(sub) for sub in node[key]]
    return node


def crd_problems(doc: dict, folder: Path) -> list[str]:
    """Where ``doc`` breaks its kind's published CRD schema, one line each."""
    import jsonschema

    schema = crd_schema(doc["kind"], folder)
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'.'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
            for error in validator.iter_errors(doc)]


def env_sources(container: dict) -> dict[str, dict]:
    """Variable name -> its env entry (value or valueFrom)."""
    return {entry["name"]: entry for entry in container.get("env") or []}


def configmaps() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc.get("data") or {} for path in KUBERAY.glob("*.yaml")
            for doc in load_docs(path) if doc.get("kind") == "ConfigMap"}


def serve_config() -> dict:
    return yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])


def assert_known_serve_fields(config: dict) -> None:
    """Ray Serve's schema ignores unknown keys, so a misspelt option would be dropped silently."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    def unknown(data: dict, model) -> set[str]:
        return set(data) - set(model.model_fields)

    assert not unknown(config, ServeDeploySchema), f"serveConfigV2: unknown {unknown(config, ServeDeploySchema)}"
    for app in config["applications"]:
        assert not unknown(app, ServeApplicationSchema), f"{app['name']}: unknown {unknown(app, ServeApplicationSchema)}"
        for deployment in app.get("deployments") or []:
            parts = [(deployment, DeploymentSchema), (deployment.get("autoscaling_config") or {}, AutoscalingConfig),
                     (deployment.get("ray_actor_options") or {}, RayActorOptionsSchema)]
            for data, model in parts:
                assert not unknown(data, model), (
                    f"{deployment['name']}: unknown {model.__name__} fields {unknown(data, model)}")


DEPLOYMENT_DECORATORS = {"serve.deployment", "ray.serve.deployment", "deployment"}


def serve_deployments(tree: ast.Module) -> set[str]:
    """Names of the Ray Serve deployments a module declares: classes and functions decorated with
    ``@serve.deployment`` (its ``name=``, else their own name), and ``serve.deployment(name=...)``
    or ``<deployment>.options(name=...)`` calls."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if ast.unparse(target) in DEPLOYMENT_DECORATORS:
                    keywords = decorator.keywords if isinstance(decorator, ast.Call) else []
                    if not any(kw.arg == "name" for kw in keywords):
                        names.add(node.name)
        if isinstance(node, ast.Call) and (
                ast.unparse(node.func) in DEPLOYMENT_DECORATORS
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "options")):
            names |= {kw.value.value for kw in node.keywords
                      if kw.arg == "name" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)}
    return names


def room_imports(tree: ast.Module, module: str) -> list[str]:
    """Modules of ``module``'s own room (its package, e.g. ldmflow.serving) that it imports,
    whether as ``from ldmflow.serving.replica import X``, ``from ldmflow.serving import replica``
    or relatively; names that are not modules with a source file are left out."""
    room = module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.split(".")[: -node.level]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.append(base)
            if base == room:
                found += [f"{room}.{alias.name}" for alias in node.names]
    in_room = [name for name in found if name.startswith(room + ".") and name != module]
    return sorted({name for name in in_room if module_source(name).is_file()})


# ---- helpers: compose ---------------------------------------------------------------


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_variables() -> dict[str, set[str]]:
    """Variable name -> the modifiers it is used with (":?msg", ":-default", "")."""
    found: dict[str, set[str]] = {}
    for name, modifier in COMPOSE_VAR.findall(COMPOSE.read_text()):
        found.setdefault(name, set()).add(modifier)
    return found


def env_example() -> dict[str, str]:
    pairs = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"env.example: not KEY=value: {line!r}"
            pairs[key.strip()] = value.strip()
    return pairs


def service_strings(service: dict) -> list[str]:
    """Every string in a service's command, entrypoint and environment."""
    out = []
    for key in ("command", "entrypoint"):
        value = service.get(key)
        out += [value] if isinstance(value, str) else list(value or [])
    env = service.get("environment") or {}
    out += [str(v) for v in env.values()] if isinstance(env, dict) else list(env)
    return out


def is_reference(value: str) -> bool:
    """A value that is exactly one compose variable without a default: ${VAR} or ${VAR:?msg}."""
    match = COMPOSE_VAR.fullmatch(value.strip())
    return bool(match) and (match.group(2) == "" or match.group(2).startswith((":?", "?")))


# ---- helpers: Dockerfile ------------------------------------------------------------


def dockerfile(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        instructions.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return instructions


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    return dict(arg.split("=", 1) for kw, arg in dockerfile(path) if kw == "ARG" and "=" in arg)


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def pip_installs(path: Path = DOCKERFILE) -> list[list[str]]:
    """The arguments of every `pip install` in RUN instructions, ARGs expanded."""
    args = dockerfile_args(path)
    found = []
    for keyword, command in dockerfile(path):
        if keyword != "RUN":
            continue
        for part in re.split(r"&&|;", expand(command, args)):
            words = shlex.split(part)
            if "pip" in words[:3] and "install" in words:
                found.append(words[words.index("install") + 1:])
    return found


def pinned_version(name: str, path: Path = DOCKERFILE) -> Version:
    pins = [Requirement(w) for words in pip_installs(path) for w in words if not w.startswith("-") and w != "."]
    versions = [next(iter(r.specifier)).version for r in pins if r.name == name and len(r.specifier) == 1
                and next(iter(r.specifier)).operator == "=="]
    assert versions, f"{path.name} does not pip install {name}==VERSION"
    return Version(versions[0])


def copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (not --from a stage)."""
    found = []
    for keyword, rest in dockerfile():
        if keyword != "COPY":
            continue
        words = shlex.split(rest)
        if any(w.startswith("--from") for w in words):
            continue
        words = [w for w in words if not w.startswith("--")]
        found.append(([w.strip("/").removeprefix("./") for w in words[:-1]], words[-1]))
    return found


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves ``path`` out of the context: the last matching pattern wins,
    a pattern matches a path or any of its parent folders, and ``**/`` may match nothing."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        alternatives = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# ---- helpers: credentials -----------------------------------------------------------


def literal_secrets(text: str) -> list[str]:
    """Things that look like a credential written into a file."""
    found = re.findall(r"\bAKIA[0-9A-Z]{16}\b", text) + re.findall(r"\bminioadmin\b", text)
    found += [f"{user}:{password}@" for user, password in URL_USERINFO.findall(text) if not is_reference(password)]
    return found
