"""infra/ is checked against the project and against what KubeRay and compose accept.

No Docker, no Kubernetes, no network: the files are parsed and cross-checked.

- KubeRay manifests are validated by a small explicit validator written from the v1 CRD
  types (ray-operator/apis/ray/v1/*_types.go) and the operator's validation rules
  (ray-operator/controllers/ray/utils/validation.go); the Serve config inside the
  RayService is validated by Ray Serve's own schema.
- The compose stack: service references, healthchecks, ports, variables, credentials.
- The Dockerfile: what it installs agrees with pyproject.toml.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
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


def project_packages() -> list[str]:
    """Top-level packages from [tool.setuptools.packages.find] include ("data*" -> data)."""
    include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({pattern.rstrip("*").rstrip(".") for pattern in include})


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


# ---- every file parses ----------------------------------------------------------------


def test_infra_has_the_expected_files():
    expected = {"Dockerfile", "Dockerfile.dockerignore", "compose.yaml", "env.example", "README.md",
                "mlflow.Dockerfile", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml",
                "kuberay/configmap.yaml"}
    missing = {name for name in expected if not (INFRA / name).is_file()}
    assert not missing, f"infra/ lacks {sorted(missing)}"


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(INFRA)))
def test_every_infra_yaml_parses(path):
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    assert all(isinstance(doc, dict) for doc in docs), f"{path}: every document should be a mapping"


# ---- KubeRay ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, doc", ray_manifests(), ids=[name for name, _ in ray_manifests()])
def test_kuberay_manifest_satisfies_the_v1_crd(name, doc):
    problems = validate_ray_resource(doc)
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_there_is_one_of_each_kuberay_kind():
    kinds = sorted(doc["kind"] for _, doc in ray_manifests())
    assert kinds == sorted(RAY_KINDS), f"infra/kuberay holds {kinds}"


def test_the_validator_catches_what_the_operator_refuses():
    """The validator is not vacuous: each broken copy of the RayCluster is caught."""
    import copy

    good = manifest("RayCluster")
    assert validate_ray_resource(good) == []

    def broken(edit) -> list[str]:
        doc = copy.deepcopy(good)
        edit(doc["spec"])
        return validate_ray_resource(doc)

    gpu = next(i for i, g in enumerate(good["spec"]["workerGroupSpecs"]) if is_gpu_group(g))
    cases = {
        "min > max": lambda s: s["workerGroupSpecs"][0].update(minReplicas=5, replicas=5, maxReplicas=2),
        "no image": lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
        "numeric param": lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
        "no GPU limit": lambda s: s["workerGroupSpecs"][gpu]["template"]["spec"]["containers"][0]["resources"][
            "limits"].pop(GPU),
        "misspelt field": lambda s: s.update(enableInTreeAutoScaling=True),
        "no rayStartParams": lambda s: s["workerGroupSpecs"][0].pop("rayStartParams"),
    }
    for case, edit in cases.items():
        assert broken(edit), f"the validator accepts a RayCluster with {case}"


def test_raycluster_runs_work_on_autoscaled_workers():
    spec = manifest("RayCluster")["spec"]
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0", "the head should take no tasks (num-cpus: \"0\")"
    assert head.get("dashboard-host") == "0.0.0.0", "the dashboard (job submission) must listen beyond localhost"
    assert spec.get("enableInTreeAutoscaling") is True
    workers = spec["workerGroupSpecs"]
    gpu_groups = [g for g in workers if is_gpu_group(g)]
    assert gpu_groups and any(not is_gpu_group(g) for g in workers), "needs a CPU group and a GPU group"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 < group["maxReplicas"], f"{group['groupName']}: GPUs should scale from zero"


def test_every_kuberay_cluster_has_a_gpu_group():
    for name, doc in ray_manifests():
        assert any(is_gpu_group(g) for _, g in groups(cluster_spec(doc))[1:]), f"{name}: no GPU worker group"


def test_rayjob_runs_the_pipeline_with_a_config_in_the_image():
    spec = manifest("RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    scripts = pyproject()["project"]["scripts"]
    assert argv[0] in scripts, f"entrypoint runs {argv[0]!r}, not a console script of the project ({sorted(scripts)})"
    assert argv[1] == "pipeline", f"entrypoint should run the pipeline subcommand: {argv}"
    assert "--config" in argv, f"entrypoint names no --config: {argv}"
    config = argv[argv.index("--config") + 1]
    assert config.startswith(APP_DIR + "/"), f"{config} is not under {APP_DIR}, where the image puts configs/"
    relative = config[len(APP_DIR) + 1:]
    assert (ROOT / relative).is_file(), f"{config} maps to {relative}, which is not in the repository"
    top = relative.split("/")[0]
    assert ([top], f"{APP_DIR}/{top}/") in copies(), f"infra/Dockerfile does not COPY {top}/ to {APP_DIR}/{top}/"
    assert spec.get("shutdownAfterJobFinishes") is True, "the job's cluster should go away when the job ends"
    assert spec.get("ttlSecondsAfterFinished", 0) > 0 and spec.get("activeDeadlineSeconds", 0) > 0
    assert 0 <= spec.get("backoffLimit", -1) <= 3


def test_rayjob_subcommand_exists_in_the_cli():
    import typer.main

    from flows.cli import app

    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    subcommand = argv[1]
    commands = typer.main.get_command(app).commands
    if subcommand not in commands:
        pytest.skip(f"`ldmflow {subcommand}` is not in flows/cli.py yet (commands: {sorted(commands)})")
    params = {opt for param in commands[subcommand].params for opt in param.opts}
    options = [word.split("=")[0] for word in argv[2:] if word.startswith("-")]
    assert set(options) <= params, f"`ldmflow {subcommand}` takes no {sorted(set(options) - params)}"


def test_rayservice_serve_config_is_valid_for_ray_serve():
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    ServeDeploySchema.model_validate(config)  # raises on a value Ray Serve would refuse
    assert_known_serve_fields(config)
    apps = config["applications"]
    assert [app["name"] for app in apps] == ["ldmflow"]
    app = apps[0]
    assert app["route_prefix"] == "/"
    module, _, attribute = app["import_path"].partition(":")
    assert (module, attribute) == ("serving.app", "build_app"), app["import_path"]
    assert module.split(".")[0] in project_packages(), f"{module} is not in a package the image installs"
    assert re.fullmatch(r"models:/[\w.-]+@production", app["args"]["model_uri"]), app["args"]


def test_rayservice_sampler_autoscales_on_gpu_fractions():
    (deployment,) = serve_config()["applications"][0]["deployments"]
    assert deployment["name"] == "SamplerServer"
    scaling = deployment["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] <= scaling["max_replicas"]
    assert "num_replicas" not in deployment, "num_replicas and autoscaling_config exclude each other"
    assert scaling["target_ongoing_requests"] <= deployment["max_ongoing_requests"]
    gpus = deployment["ray_actor_options"]["num_gpus"]
    assert 0 < gpus < 1, f"a replica should take a fraction of a GPU, got {gpus}"
    # The GPU group at its largest holds max_replicas replicas.
    spec = manifest("RayService")["spec"]["rayClusterConfig"]
    capacity = sum(g["maxReplicas"] * containers(g)[0]["resources"]["limits"][GPU]
                   for _, g in groups(spec)[1:] if is_gpu_group(g))
    assert scaling["max_replicas"] * gpus <= capacity, f"{scaling['max_replicas']} x {gpus} GPUs > {capacity} GPUs"
    assert spec.get("enableInTreeAutoscaling") is True, "GPU pods must follow Serve's replica count"


def test_serve_application_matches_the_source():
    """What serveConfigV2 names exists in serving/app.py: the builder, the deployments it
    overrides (Ray Serve refuses an override for a deployment the app does not have), and
    the builder's arguments."""
    import dataclasses
    import importlib

    app = serve_config()["applications"][0]
    module_name, _, attribute = app["import_path"].partition(":")
    source = ROOT / (module_name.replace(".", "/") + ".py")
    if not source.exists():
        pytest.skip(f"{source.relative_to(ROOT)} is not written yet")
    tree = ast.parse(source.read_text())
    functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert attribute in functions, f"{source.relative_to(ROOT)} defines no function {attribute}"
    deployments = {n.name for n in tree.body if isinstance(n, ast.ClassDef)} | {
        kw.value.value for n in ast.walk(tree) if isinstance(n, ast.Call)
        for kw in n.keywords if kw.arg == "name" and isinstance(kw.value, ast.Constant)}
    for deployment in app.get("deployments") or []:
        assert deployment["name"] in deployments, f"{source.relative_to(ROOT)} has no deployment {deployment['name']!r}"
    module = importlib.import_module(module_name)
    config_class = getattr(module, "ServeConfig", None)  # build_app(args): model_uri + ServeConfig fields
    if config_class is not None:
        accepted = {"model_uri"} | {f.name for f in dataclasses.fields(config_class)}
        assert set(app["args"]) <= accepted, f"{attribute} does not take {sorted(set(app['args']) - accepted)}"
    assert "model_uri" in app["args"]


def test_kuberay_images_and_ray_version_match_the_dockerfile():
    ray_version = pinned_version("ray")
    assert requirement("ray").specifier.contains(ray_version), f"the image's ray {ray_version} breaks pyproject"
    for name, doc in ray_manifests():
        spec = cluster_spec(doc)
        assert Version(spec.get("rayVersion", "0")) == ray_version, f"{name}: rayVersion differs from the image's Ray"
        for group_name, group in groups(spec):
            image = containers(group)[0]["image"]
            # A placeholder to replace; no registry host is named in the repository.
            assert image == "ldmflow:latest", f"{name}/{group_name}: image {image!r}"


def test_ray_containers_get_endpoints_from_the_configmap_and_credentials_from_the_secret():
    maps = configmaps()
    assert "ldmflow-endpoints" in maps, "configmap.yaml should define ConfigMap ldmflow-endpoints"
    documented = set(re.findall(r"--from-literal=(\w+)=", (KUBERAY / "configmap.yaml").read_text()))
    assert documented >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, (
        "configmap.yaml should show how to create the Secret")
    needed = {"AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for name, doc in ray_manifests():
        for group_name, group in groups(cluster_spec(doc)):
            env = env_sources(containers(group)[0])
            assert needed <= set(env), f"{name}/{group_name}: missing {sorted(needed - set(env))}"
            for var, entry in env.items():
                source = entry.get("valueFrom") or {}
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in maps.get(ref["name"], {}), f"{name}/{group_name}: {var} reads missing {ref}"
                if "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    assert ref["name"] == "ldmflow-s3" and ref["key"] in documented, (
                        f"{name}/{group_name}: {var} reads {ref}")


# ---- credentials and exposure -------------------------------------------------------


def literal_secrets(text: str) -> list[str]:
    """Things that look like a credential written into a file."""
    found = re.findall(r"\bAKIA[0-9A-Z]{16}\b", text) + re.findall(r"\bminioadmin\b", text)
    found += [f"{user}:{password}@" for user, password in URL_USERINFO.findall(text) if not is_reference(password)]
    return found


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")), ids=lambda p: p.name)
def test_manifests_hold_no_literal_credentials(path):
    assert not literal_secrets(path.read_text()), f"{path.name}: {literal_secrets(path.read_text())}"
    for doc in load_docs(path):
        if doc.get("kind") == "ConfigMap":
            bad = [k for k in doc.get("data") or {} if CREDENTIAL_NAME.search(k)]
            assert not bad, f"{path.name}: credentials {bad} belong in a Secret, not a ConfigMap"
        assert doc.get("kind") != "Secret", f"{path.name}: a Secret with values is committed; create it with kubectl"
        if doc.get("kind") not in RAY_KINDS:
            continue
        for group_name, group in groups(cluster_spec(doc)):
            for container in containers(group):
                for var, entry in env_sources(container).items():
                    if CREDENTIAL_NAME.search(var):
                        assert "value" not in entry and "secretKeyRef" in (entry.get("valueFrom") or {}), (
                            f"{path.name}/{group_name}: {var} must come from a secretKeyRef")


def test_compose_holds_no_literal_credentials():
    text = COMPOSE.read_text()
    assert not literal_secrets(text), f"compose.yaml: {literal_secrets(text)}"
    for name, service in compose()["services"].items():
        env = service.get("environment") or {}
        assert isinstance(env, dict), f"{name}: write environment as a mapping"
        for var, value in env.items():
            if CREDENTIAL_NAME.search(var):
                assert is_reference(str(value)), f"{name}: {var} should be ${{VAR}} from infra/.env, not {value!r}"
    with_default = [v for v, mods in compose_variables().items() if CREDENTIAL_NAME.search(v)
                    and any(m.startswith((":-", "-")) for m in mods)]
    assert not with_default, f"credentials with a default value in compose.yaml: {with_default}"


def test_compose_publishes_ports_on_localhost_only():
    for name, service in compose()["services"].items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            assert host_ip == "127.0.0.1", f"{name}: port {port!r} should be bound to 127.0.0.1"


# ---- compose ----------------------------------------------------------------------------


def test_compose_dependencies_exist_and_wait_for_health():
    services = compose()["services"]
    conditions = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        depends = {d: {"condition": "service_started"} for d in depends} if isinstance(depends, list) else depends
        for target, options in depends.items():
            assert target in services, f"{name} depends on undefined service {target!r}"
            condition = options.get("condition")
            assert condition in conditions, f"{name} -> {target}: condition {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy; it has no healthcheck"
            if condition == "service_started":
                pytest.fail(f"{name} -> {target}: wait for service_healthy (or service_completed_successfully)")


def test_compose_long_running_services_have_healthchecks():
    services = compose()["services"]
    postgres = {name for name, s in services.items() if str(s.get("image", "")).startswith("postgres")}
    assert len(postgres) >= 1, "no PostgreSQL service"
    for name in {"minio", "mlflow", "prefect"} | postgres:
        assert name in services, f"no {name} service"
        check = services[name].get("healthcheck") or {}
        assert check.get("test"), f"{name} has no healthcheck"
    for name in postgres:
        assert "pg_isready" in " ".join(services[name]["healthcheck"]["test"]), f"{name}: use pg_isready"


def test_compose_services_have_images_or_buildable_dockerfiles():
    data = compose()
    for name, service in data["services"].items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
        if service.get("build"):
            build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            dockerfile_path = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile_path.is_file(), f"{name}: {dockerfile_path} does not exist"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and not source.startswith((".", "/", "~")):
                assert source in (data.get("volumes") or {}), f"{name}: named volume {source!r} is not declared"


def test_compose_variables_are_documented_in_env_example():
    used, documented = set(compose_variables()), env_example()
    assert used, "compose.yaml takes no variables from infra/.env"
    assert used == set(documented), (
        f"undocumented in env.example: {sorted(used - set(documented))}; unused: {sorted(set(documented) - used)}")
    assert all(documented.values()), "env.example should give an example value for every variable"


def test_compose_urls_name_services_and_buckets_that_exist():
    services = compose()["services"]
    for name, service in services.items():
        for text in service_strings(service):
            for scheme, host in re.findall(r"([a-z][a-z0-9+]*)://(?:[^@/\s]*@)?([A-Za-z0-9.-]+)", text):
                if scheme != "s3" and host not in ("localhost", "127.0.0.1", "0.0.0.0"):
                    assert host in services, f"{name}: {text!r} names host {host!r}, not a compose service"
    created = set(re.findall(r"local/([\w.-]+)", " ".join(service_strings(services["minio-setup"]))))
    mlflow = " ".join(service_strings(services["mlflow"]))
    (bucket,) = re.findall(r"--artifacts-destination[= ]s3://([\w.-]+)", mlflow)
    assert bucket in created, f"MLflow stores artifacts in {bucket}, which minio-setup does not create ({created})"
    assert {"ldmflow-data", "ldmflow-mlflow"} <= created
    env = services["mlflow"]["environment"]
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    prefect = services["prefect"]["environment"]
    assert prefect["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert str(prefect["PREFECT_SERVER_ANALYTICS_ENABLED"]).lower() == "false"


def test_mlflow_server_image_matches_the_client_requirement():
    version = pinned_version("mlflow", INFRA / "mlflow.Dockerfile")
    assert requirement("mlflow").specifier.contains(version), f"server mlflow {version} vs {requirement('mlflow')}"


# ---- Dockerfile -------------------------------------------------------------------------


def test_dockerfile_installs_a_torch_that_pyproject_accepts_before_the_project():
    version = pinned_version("torch")
    assert dockerfile_args()["TORCH_VERSION"] == str(version), "torch's version should be the build ARG TORCH_VERSION"
    assert requirement("torch").specifier.contains(version), f"torch {version} vs pyproject {requirement('torch')}"
    installs = pip_installs()
    torch_at = [i for i, words in enumerate(installs) if any(w.startswith("torch==") for w in words)]
    project_at = [i for i, words in enumerate(installs) if "." in words]
    assert torch_at and project_at and torch_at[0] < project_at[0] and torch_at[0] not in project_at, (
        "torch should be installed in its own step, before the project")


def test_dockerfile_base_python_satisfies_requires_python():
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    bases = [expand(arg, dockerfile_args()).split()[0] for kw, arg in dockerfile() if kw == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        match = re.fullmatch(r"python:(\d+\.\d+)(?:\.\d+)?-slim", base)
        assert match, f"base image {base!r} should be python:X.Y-slim"
        assert requires.contains(match.group(1)), f"{base} does not satisfy requires-python {requires}"


def test_dockerfile_installs_the_project_without_test_extras():
    projects = [words for words in pip_installs() if "." in words]
    assert projects, "the Dockerfile never runs `pip install .`"
    for words in pip_installs():
        assert "-e" not in words and "--editable" not in words, "install the project, not an editable link"
        assert not any(w.startswith(".[") for w in words), f"no extras in the image: {words}"
    assert not any("venv" in command for kw, command in dockerfile() if kw == "RUN"), (
        "install into the system Python: KubeRay starts Ray in a login shell, whose PATH drops a venv's bin/")


def test_dockerfile_copies_every_package_and_the_build_files():
    copied = {source for sources, _ in copies() for source in sources}
    needed = set(project_packages()) | {"pyproject.toml", pyproject()["project"]["readme"], "configs"}
    assert needed <= copied, f"infra/Dockerfile does not COPY {sorted(needed - copied)}"
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_dockerfile_entrypoint_is_the_console_script():
    instructions = dict(dockerfile())  # the last of each instruction counts
    scripts = pyproject()["project"]["scripts"]
    entrypoint = yaml.safe_load(instructions["ENTRYPOINT"])
    assert entrypoint == ["ldmflow"] and "ldmflow" in scripts, f"ENTRYPOINT {entrypoint} vs scripts {scripts}"
    assert yaml.safe_load(instructions["CMD"]) == ["--help"]


def test_dockerfile_runtime_settings():
    instructions = dockerfile()
    env = " ".join(arg for kw, arg in instructions if kw == "ENV")
    assert "LDMFLOW_HOME=/var/lib/ldmflow" in env and "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env, env
    volumes = " ".join(arg for kw, arg in instructions if kw == "VOLUME")
    assert "/var/lib/ldmflow" in volumes, "LDMFLOW_HOME should be a volume"
    users = [arg for kw, arg in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"the image should run as a non-root user: {users}"


def test_dockerignore_keeps_what_the_image_needs_and_nothing_else():
    patterns = dockerignore_patterns()
    for sources, _ in copies():
        for source in sources:
            path = ROOT / source
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            for file in files:
                relative = file.relative_to(ROOT).as_posix()
                if "__pycache__" in relative:
                    continue
                assert not dockerignored(relative, patterns), f"{relative} is copied but excluded by the dockerignore"
    for private in ("tests/conftest.py", ".venv/pyvenv.cfg", ".ldmflow/mlflow.db", ".git/config", "infra/.env",
                    "data/__pycache__/x.pyc", "benchmarks/x.py"):
        assert dockerignored(private, patterns), f"{private} would be sent in the build context"


def test_readme_explains_the_stack():
    text = (INFRA / "README.md").read_text()
    for needed in ("docker compose", "AWS_ENDPOINT_URL=http://127.0.0.1:9000",
                   "MLFLOW_TRACKING_URI=http://127.0.0.1:5000", "PREFECT_API_URL=http://127.0.0.1:4200/api",
                   "docker build -f infra/Dockerfile", "kubectl apply -f infra/kuberay/"):
        assert needed in text, f"infra/README.md does not mention {needed!r}"
    for path in INFRA.rglob("*"):
        if path.is_file() and path.name not in (".env", "README.md"):
            assert path.name in text, f"infra/README.md does not describe {path.name}"


def test_no_registry_host_is_written_in_infra():
    hosts = re.compile(r"\b(?:[a-z0-9-]+\.)+(?:io|com|dev|org|net)/[\w./-]+:[\w.-]+")
    for path in INFRA.rglob("*"):
        if path.is_file():
            found = hosts.findall(path.read_text())
            assert not found, f"{path.relative_to(ROOT)} names an image by registry host: {found}"
