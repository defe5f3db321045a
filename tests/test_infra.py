"""infra/ is checked against the project and against what KubeRay and compose accept.

No Docker, no Kubernetes, no network: the files are parsed and cross-checked.

- KubeRay manifests are validated against KubeRay's published v1 CRD schemas (the release's
  ray.io_*.yaml, kept in shared/kuberay/VERSION beside the checkout or named by
  LDMFLOW_KUBERAY_CRDS; skipped where neither is there), strictly as the API server with
  --validate=strict, and by a small explicit validator of the operator's own rules that no
  schema states (tests/infra_checks.py); the Serve config inside the RayService is
  validated by Ray Serve's own schema and against its source.
- The compose stack: against the Compose Specification's JSON schema (as check-jsonschema
  ships it), then service references, healthchecks, ports, variables, credentials.
- The Dockerfile: what it installs and copies agrees with pyproject.toml.
"""

from __future__ import annotations

import ast
import re
import shlex

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.infra_checks import (
    APP_DIR,
    COMPOSE,
    CREDENTIAL_NAME,
    GPU,
    INFRA,
    KUBERAY,
    RAY_KINDS,
    ROOT,
    assert_known_serve_fields,
    cluster_spec,
    compose,
    compose_variables,
    configmaps,
    crd_problems,
    containers,
    copies,
    dockerfile,
    dockerfile_args,
    dockerignore_patterns,
    dockerignored,
    env_example,
    env_sources,
    expand,
    groups,
    is_gpu_group,
    is_reference,
    kuberay_crd_folder,
    literal_secrets,
    load_docs,
    manifest,
    module_source,
    pinned_version,
    pip_installs,
    project_packages,
    pyproject,
    ray_manifests,
    requirement,
    room_imports,
    serve_config,
    serve_deployments,
    service_strings,
    validate_ray_resource,
    yaml_files,
)

# ---- every file parses ----------------------------------------------------------------


def test_infra_has_the_expected_files():
    expected = {"Dockerfile", "Dockerfile.dockerignore", "compose.yaml", "env.example", "README.md",
                "mlflow.Dockerfile", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml",
                "kuberay/configmap.yaml", "prometheus/podmonitor.yaml", "prometheus/prometheus.yml"}
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


@pytest.fixture(scope="module")
def crds():
    folder = kuberay_crd_folder()
    if not folder.is_dir():
        pytest.skip(f"KubeRay's published CRDs are not at {folder} (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml, "
                    "ray.io_rayservices.yaml of the release; or set LDMFLOW_KUBERAY_CRDS)")
    return folder


@pytest.mark.parametrize("name, doc", ray_manifests(), ids=[name for name, _ in ray_manifests()])
def test_kuberay_manifest_satisfies_the_published_crd_schema(name, doc, crds):
    problems = crd_problems(doc, crds)
    assert not problems, f"{name}:\n  " + "\n  ".join(problems)


def test_the_published_crd_schema_bites(crds):
    """Strict, as the API server with --validate=strict: a misspelt field, a wrong type and a
    missing required field are each refused."""
    import copy

    good = manifest("RayCluster")
    cases = {
        "misspelt field": lambda s: s["workerGroupSpecs"][0].update(minReplica=1),
        "wrong type": lambda s: s["workerGroupSpecs"][0].update(maxReplicas="four"),
        "no group name": lambda s: s["workerGroupSpecs"][0].pop("groupName"),
    }
    for case, edit in cases.items():
        doc = copy.deepcopy(good)
        edit(doc["spec"])
        assert crd_problems(doc, crds), f"the CRD schema accepts a RayCluster with {case}"


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

    from ldmflow.flows.cli import app

    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    subcommand = argv[1]
    commands = typer.main.get_command(app).commands
    assert subcommand in commands, f"`ldmflow {subcommand}` is not in flows/cli.py yet (commands: {sorted(commands)})"
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
    assert (module, attribute) == ("ldmflow.serving.app", "build_app"), app["import_path"]
    assert module.split(".")[0] == "ldmflow", f"{module}: everything is installed under the one package ldmflow"
    package = module.rpartition(".")[0]
    assert package in project_packages(), (
        f"{module} is not in a package the image installs ({sorted(project_packages())})")
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
    """What serveConfigV2 names exists in the source: the builder in the module that
    import_path names (found through pyproject's package-dir), the deployments it overrides
    (Ray Serve refuses an override for a deployment the app does not have), declared there
    or in a module of the same room that it imports, and the builder's arguments."""
    import dataclasses
    import importlib

    from ray.serve import Deployment

    app = serve_config()["applications"][0]
    module_name, _, attribute = app["import_path"].partition(":")
    source = module_source(module_name)
    where = source.relative_to(ROOT)
    assert source.is_file(), f"{where} (the source of {module_name}) is not written yet"
    tree = ast.parse(source.read_text())
    functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert attribute in functions, f"{where} defines no function {attribute}"
    imported = room_imports(tree, module_name)
    declared = serve_deployments(tree).union(
        *(serve_deployments(ast.parse(module_source(name).read_text())) for name in imported))
    module = importlib.import_module(module_name)
    bound = {value.name for value in vars(module).values() if isinstance(value, Deployment)}
    for deployment in app.get("deployments") or []:
        name = deployment["name"]
        assert name in declared, (
            f"neither {where} nor the modules it imports from its room ({imported}) declare a deployment {name!r}")
        assert name in bound, f"{module_name} holds no Ray Serve deployment named {name!r} (it has {sorted(bound)})"
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
                    assert ref["name"] in {"ldmflow-s3", "ldmflow-api"} and ref["key"] in documented, (
                        f"{name}/{group_name}: {var} reads {ref}")


def test_rayservice_serves_with_api_keys_from_a_secret():
    """build_app refuses to serve without keys (the Service exposes it); the RayService's pods
    read them from Secret ldmflow-api, whose creation configmap.yaml shows."""
    for group_name, group in groups(cluster_spec(manifest("RayService"))):
        ref = env_sources(containers(group)[0])["LDMFLOW_API_KEYS"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "ldmflow-api", "key": "LDMFLOW_API_KEYS"}, (group_name, ref)
    assert "create secret generic ldmflow-api" in (KUBERAY / "configmap.yaml").read_text()
    assert "allow_unauthenticated" not in serve_config()["applications"][0]["args"]


# ---- metrics -----------------------------------------------------------------------------


def sampler_pods() -> list[tuple[str, dict]]:
    """(group name, pod template) of every group of the RayService's cluster."""
    return [(name, group["template"]) for name, group in groups(cluster_spec(manifest("RayService")))]


def test_the_podmonitor_scrapes_every_sampler_pod_on_its_metrics_port():
    monitor = load_docs(INFRA / "prometheus" / "podmonitor.yaml")[0]
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    for name, template in sampler_pods():
        labels = (template.get("metadata") or {}).get("labels") or {}
        assert selector.items() <= labels.items(), (name, labels)
        ports = {port["name"]: port["containerPort"] for port in template["spec"]["containers"][0]["ports"]}
        assert ports.get(endpoint["port"]) == 8080, (name, ports)  # KubeRay's --metrics-export-port
    assert not (selector.keys() & {"ray.io/cluster", "ray.io/node-type", "ray.io/group"})  # KubeRay's own


def test_prometheus_config_finds_ray_nodes_and_the_sampler_pods():
    config = load_docs(INFRA / "prometheus" / "prometheus.yml")[0]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    # Ray writes this file into its temp folder (the default one here), listing every node.
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    assert jobs["ray"]["file_sd_configs"][0]["files"] == [f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}"]
    keep = {rule["source_labels"][0]: rule["regex"] for rule in jobs["ldmflow-sampler"]["relabel_configs"]
            if rule.get("action") == "keep"}
    assert keep.pop("__meta_kubernetes_pod_container_port_name") == "metrics"
    assert keep and all(source.startswith("__meta_kubernetes_pod_label_") for source in keep)
    for name, template in sampler_pods():
        # Prometheus's names for pod labels: every character but [a-zA-Z0-9_] becomes "_".
        labels = {re.sub(r"\W", "_", key): value for key, value in template["metadata"]["labels"].items()}
        for source, regex in keep.items():
            assert labels.get(source.removeprefix("__meta_kubernetes_pod_label_")) == regex, (name, source)
    for rule in (r for job in jobs.values() for r in job.get("relabel_configs", [])):
        assert set(rule) <= {"source_labels", "regex", "action", "target_label", "replacement", "separator"}, rule


# ---- credentials and exposure -------------------------------------------------------


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


def compose_spec_validator():
    """The Compose Specification's JSON schema, as the check-jsonschema package ships it
    (its vendored copy, versioned with that package: see its builtin_schemas/vendor)."""
    import json
    from importlib.resources import files

    import jsonschema

    schema = json.loads((files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text())
    return jsonschema.validators.validator_for(schema)(schema)


def test_compose_file_follows_the_compose_specification():
    validator = compose_spec_validator()
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, errors
    # The schema bites: a misspelt service key and a healthcheck of the wrong type are refused.
    broken = compose()
    name = next(iter(broken["services"]))
    broken["services"][name]["imagee"] = "x"
    broken["services"][name]["healthcheck"] = "curl"
    assert len(list(validator.iter_errors(broken))) >= 2


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
    folders = set(project_packages().values())
    for folder in folders:
        assert (ROOT / folder / "__init__.py").is_file(), (
            f"pyproject.toml maps a package to {folder}/, which has no __init__.py")
    uncopied = {f for f in folders if not any(f == c or f.startswith(c + "/") for c in copied)}
    assert not uncopied, f"infra/Dockerfile does not COPY the package folders {sorted(uncopied)}"
    needed = {"pyproject.toml", pyproject()["project"]["readme"], "configs"}
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
