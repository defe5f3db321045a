"""The Ray Serve sampler: an HTTP JSON API over :class:`serving.sampler.Sampler`.

``POST /v1/generate``, ``POST /v1/edit`` (SDEdit), ``POST /v1/inpaint``, ``GET /v1/model``,
``GET /healthz``; the OpenAPI document is at ``/openapi.json`` (FastAPI). Requests that can
share a timestep schedule (same mode, sampler, steps and edit strength) are batched with
``@serve.batch``, and both classifier-free guidance passes of a batch run as one UNet call.

Everything a request carries is checked before it reaches a batch: malformed JSON, unknown
fields, out-of-range values, configured limits (steps, images, upload size and pixels), bad
base64, undecodable images, masks of the wrong size, labels the model does not have. Each
gets a 4xx whose ``error`` names the field; nothing a client sends can take a replica down.

The deployment follows a registry alias: with ``models:/NAME@ALIAS`` it polls the alias
every ``follow_seconds`` and, when it moves, loads the new version beside the old one and
swaps. Batches already running finish on the model they started with, so a promotion
reaches the server without a failed request. ``reconfigure`` (a new ``user_config``) swaps
the same way.
"""


import asyncio
import base64
import binascii
import io
import logging
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

log = logging.getLogger("ldmflow.serve")


@dataclass(frozen=True)
class ServeConfig:
    """Configuration of ``ldmflow serve`` (section ``serve:`` of a config file)."""

    host: str = "127.0.0.1"
    port: int = 8000
    num_replicas: int = 1  # the minimum when autoscaling
    max_replicas: int = 0  # above num_replicas: autoscale between the two
    target_ongoing_requests: float = 4.0  # autoscaling target per replica
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; a fraction shares one GPU between replicas
    max_ongoing_requests: int = 32  # per replica; at least max_batch_size or batches stop short
    max_batch_size: int = 8  # requests per batch; 1 turns batching off
    batch_wait_timeout_s: float = 0.02
    max_steps: int = 100
    max_images: int = 16  # per request
    max_image_bytes: int = 4_000_000  # an uploaded image or mask, decoded from base64
    max_image_pixels: int = 4_194_304  # 2048 × 2048
    follow_seconds: float = 10.0  # how often an alias is checked for a new version; 0: never

    def __post_init__(self) -> None:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be at least max_batch_size")
        if self.max_replicas and self.max_replicas < self.num_replicas:
            raise ValueError("max_replicas must be 0 or at least num_replicas")
        for name in ("num_replicas", "max_batch_size", "max_steps", "max_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


# ---------------------------------------------------------------------------------------
# The HTTP schema


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: int | None = Field(None, description="Class index (class-conditioned models).")
    prompt: str | None = Field(None, max_length=1000, description="Text (text-conditioned models).")
    n: int = Field(1, ge=1, description="Number of images.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="Image i uses seed + i; random when absent.")
    steps: int | None = Field(None, ge=1, description="Denoising steps (the model's default when absent).")
    sampler: Literal["ddpm", "ddim", "dpm++"] | None = None
    guidance: float | None = Field(None, ge=0, le=50, description="Classifier-free guidance scale.")


class EditRequest(GenerateRequest):
    image: str = Field(description="Base64 PNG or JPEG to edit.")
    strength: float = Field(0.6, ge=0, le=1, description="Share of the schedule re-run: 0 returns the input.")


class InpaintRequest(GenerateRequest):
    image: str = Field(description="Base64 PNG or JPEG.")
    mask: str = Field(description="Base64 image of the same size: white where new content goes.")


class ModelRef(BaseModel):
    name: str | None
    version: str | None
    uri: str


class ImagesResponse(BaseModel):
    images: list[str] = Field(description="Base64 PNGs.")
    seeds: list[int]
    model: ModelRef
    batch: int = Field(description="Requests sampled together with this one (itself included).")


class RequestError(Exception):
    """A request this server refuses: ``status`` and the field to blame."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.status = field, status

    @classmethod
    def of(cls, exc: ValueError, status: int = 422) -> "RequestError":
        """From the sampler's "field: message" errors."""
        field, _, message = str(exc).partition(":")
        return cls(field, message.strip(), status)


api = FastAPI(title="ldmflow sampler", version="1",
              description="Generate, edit and inpaint images with a registered ldmflow latent diffusion model.")


@api.exception_handler(RequestError)
async def _refused(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            position = error.get("loc", ("body", "?"))[-1]
            problems.append(f"body: not valid JSON (at character {position})")
            continue
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg')}")
    return JSONResponse({"error": "; ".join(problems), "detail": jsonable(exc.errors())}, status_code=422)


def jsonable(errors: list[dict]) -> list[dict]:
    """Pydantic's error records as JSON: tuples as lists, anything else odd as text."""

    def plain(value):
        if isinstance(value, tuple):
            return list(value)
        return value if isinstance(value, (str, int, float, list, type(None))) else str(value)

    return [{k: plain(v) for k, v in error.items() if k != "ctx"} for error in errors]


# ---------------------------------------------------------------------------------------
# The deployment


@dataclass
class Loaded:
    """One model version in memory: the sampler and where it came from."""

    sampler: Any
    uri: str
    name: str | None
    version: str | None
    tags: dict[str, str]
    loaded_at: float

    def ref(self) -> ModelRef:
        return ModelRef(name=self.name, version=self.version, uri=self.uri)


def load_model(uri: str) -> Loaded:
    from serving.sampler import load
    from training import tracking

    sampler, registered = load(uri)
    tags: dict[str, str] = {}
    if registered is not None:
        version = tracking.client().get_model_version(registered.name, registered.version)
        tags = {k: v for k, v in version.tags.items() if k.startswith("ldmflow.")}
        return Loaded(sampler, uri, registered.name, registered.version, tags, time.time())
    return Loaded(sampler, uri, None, None, tags, time.time())


def alias_version(uri: str) -> str | None:
    """The version an alias URI points at now (None when it is not an alias URI)."""
    from training import tracking

    if not uri.startswith("models:/") or "@" not in uri:
        return None
    name, alias = uri[len("models:/") :].split("@", 1)
    return str(tracking.client().get_model_version_by_alias(name, alias).version)


@serve.deployment(name="SamplerServer")
@serve.ingress(api)
class SamplerServer:
    """One replica: the current model, a batcher, and a thread that follows the alias."""

    def __init__(self) -> None:
        self.model: Loaded | None = None
        self.config = ServeConfig()
        self.model_uri = ""
        self._follower: threading.Thread | None = None
        self._swap = threading.Lock()

    async def reconfigure(self, user_config: dict) -> None:
        """Apply ``{"model_uri": ..., **ServeConfig fields}``; a new model is loaded before
        the old one is let go."""
        from data import config as configs

        fields = dict(user_config)
        uri = fields.pop("model_uri")
        self.config = configs.from_dict(ServeConfig, fields)
        self._sample.set_max_batch_size(self.config.max_batch_size)
        self._sample.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        if uri != self.model_uri or self.model is None:
            loaded = await asyncio.to_thread(load_model, uri)
            with self._swap:
                self.model, self.model_uri = loaded, uri
        if self._follower is None and self.config.follow_seconds > 0 and "@" in uri:
            self._follower = threading.Thread(target=self._follow, name="alias-follower", daemon=True)
            self._follower.start()

    def _follow(self) -> None:
        """Poll the alias; load a new version beside the current one, then swap. A daemon
        thread: it ends with the replica."""
        while True:
            time.sleep(self.config.follow_seconds or 10.0)
            if not self.config.follow_seconds:  # turned off by a later reconfigure
                continue
            uri = self.model_uri
            try:
                version = alias_version(uri)
                if version is None or self.model is None or version == self.model.version:
                    continue
                loaded = load_model(uri)
                with self._swap:
                    if uri == self.model_uri:
                        log.warning("alias %s moved: now serving version %s (was %s)", uri, loaded.version,
                                    self.model.version)
                        self.model = loaded
            except Exception as exc:  # the registry being away must not stop the replica
                log.warning("could not follow %s: %s", uri, exc)

    # -- batching ---------------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _sample(self, jobs: list) -> list:
        """Run a batch of jobs; incompatible jobs (other steps, sampler, mode) run as sub-batches.

        The model is read once: a swap during the batch does not affect it.
        """
        model = self.model
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.batch_key(), []).append(i)
        results: list = [None] * len(jobs)
        for indices in groups.values():
            runnable = []
            for i in indices:
                try:
                    model.sampler.check(jobs[i])  # the model may have changed since validation
                    runnable.append(i)
                except ValueError as exc:
                    results[i] = RequestError.of(exc, 409)
            if runnable:
                images = await asyncio.to_thread(model.sampler.run, [jobs[i] for i in runnable])
                for i, image in zip(runnable, images):
                    results[i] = (image, model, len(runnable))
        return results

    async def _respond(self, job) -> ImagesResponse:
        from serving.sampler import to_pil

        outcome = await self._sample(job)
        if isinstance(outcome, RequestError):
            raise outcome
        images, model, batch = outcome
        encoded = []
        for image in to_pil(images):
            out = io.BytesIO()
            image.save(out, format="PNG")
            encoded.append(base64.b64encode(out.getvalue()).decode("ascii"))
        return ImagesResponse(images=encoded, seeds=[job.seed + i for i in range(job.n)], model=model.ref(), batch=batch)

    # -- validation -------------------------------------------------------------------

    def _job(self, body: GenerateRequest, **extra):
        model = self.model
        config = self.config
        if body.n > config.max_images:
            raise RequestError("n", f"at most {config.max_images} images per request")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31 - config.max_images)
        job = model.sampler.job(n=body.n, seed=seed, label=body.label, prompt=body.prompt or None,
                                steps=body.steps, sampler=body.sampler, guidance=body.guidance, **extra)
        if job.steps > config.max_steps:
            raise RequestError("steps", f"at most {config.max_steps}")
        try:
            model.sampler.check(job)
        except ValueError as exc:
            raise RequestError.of(exc) from exc
        return job

    def _upload(self, field: str, data: str, resample: str = "bicubic"):
        """A base64 upload as (square PIL image at the model's resolution, original size).

        Decoding a large upload takes a while: callers run it in a thread, off the event
        loop that the replica's other requests share."""
        from data import images

        if len(data) > self.config.max_image_bytes * 4 // 3 + 4:
            raise RequestError(field, f"larger than {self.config.max_image_bytes} bytes", 413)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(field, f"not valid base64: {exc}") from exc
        if len(raw) > self.config.max_image_bytes:
            raise RequestError(field, f"larger than {self.config.max_image_bytes} bytes", 413)
        try:
            decoded = images.preprocess(raw, self.model.sampler.info.resolution,
                                        max_pixels=self.config.max_image_pixels, resample=resample)
        except images.Rejected as exc:
            status = 413 if "decompression bomb" in str(exc) else 422
            raise RequestError(field, str(exc), status) from exc
        return decoded.image, (decoded.width, decoded.height)

    # -- routes -----------------------------------------------------------------------

    @api.post("/v1/generate", response_model=ImagesResponse)
    async def generate(self, body: GenerateRequest) -> ImagesResponse:
        """Draw ``n`` images for a label, a prompt, or unconditionally."""
        return await self._respond(self._job(body))

    @api.post("/v1/edit", response_model=ImagesResponse)
    async def edit(self, body: EditRequest) -> ImagesResponse:
        """SDEdit: noise the image's latent to ``strength``, then denoise with the new condition."""
        image, _ = await asyncio.to_thread(self._upload, "image", body.image)
        tensor = self.model.sampler.image_tensor(image)
        fields = body.model_dump(exclude={"image", "strength"})
        return await self._respond(self._job(GenerateRequest(**fields), image=tensor, strength=body.strength))

    @api.post("/v1/inpaint", response_model=ImagesResponse)
    async def inpaint(self, body: InpaintRequest) -> ImagesResponse:
        """Keep the image where the mask is black; generate where it is white."""
        image, size = await asyncio.to_thread(self._upload, "image", body.image)
        mask, mask_size = await asyncio.to_thread(self._upload, "mask", body.mask, "nearest")
        if mask_size != size:
            raise RequestError("mask", f"{mask_size[0]}x{mask_size[1]} does not match the image's {size[0]}x{size[1]}")
        sampler = self.model.sampler
        fields = body.model_dump(exclude={"image", "mask"})
        job = self._job(GenerateRequest(**fields), image=sampler.image_tensor(image), mask=sampler.mask_tensor(mask))
        return await self._respond(job)

    @api.get("/v1/model")
    async def model_info(self) -> dict:
        """Which model this replica serves: name, version, alias, lineage, conditioning, limits."""
        model = self.model
        info = model.sampler.info
        alias = model.uri.split("@", 1)[1] if "@" in model.uri else None
        return {
            "uri": model.uri, "name": model.name, "version": model.version, "alias": alias,
            "conditioning": info.conditioning, "class_names": info.class_names, "resolution": info.resolution,
            "defaults": asdict(info.defaults), "lineage": {**info.lineage, "autoencoder": info.autoencoder},
            "tags": model.tags, "loaded_at": model.loaded_at,
            "limits": {"max_steps": self.config.max_steps, "max_images": self.config.max_images,
                       "max_image_bytes": self.config.max_image_bytes,
                       "max_image_pixels": self.config.max_image_pixels},
        }

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model.uri, "version": self.model.version}


# ---------------------------------------------------------------------------------------
# Building the application


def deployment_options(config: ServeConfig, model_uri: str) -> dict:
    """Replica resources, scaling and the ``user_config`` a replica is configured with."""
    from data import cluster, config as configs
    from training import tracking

    env = cluster.storage_runtime_env().get("env_vars", {})
    env[tracking.ENV_TRACKING_URI] = tracking.tracking_uri()
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus,
                              "runtime_env": {"env_vars": env}},
        "max_ongoing_requests": config.max_ongoing_requests,
        "user_config": {"model_uri": model_uri, **configs.to_dict(config)},
    }
    if config.max_replicas > config.num_replicas:
        options["autoscaling_config"] = {"min_replicas": config.num_replicas, "max_replicas": config.max_replicas,
                                         "target_ongoing_requests": config.target_ongoing_requests}
    else:
        options["num_replicas"] = config.num_replicas
    return options


def build_app(args: dict):
    """Application builder for Ray Serve config files (``import_path: serving.app:build_app``):
    ``args`` holds ``model_uri`` and any :class:`ServeConfig` field."""
    from data import config as configs

    fields = dict(args)
    uri = fields.pop("model_uri")
    config = configs.from_dict(ServeConfig, fields)
    return SamplerServer.options(**deployment_options(config, uri)).bind()


APP_NAME = "ldmflow"


def run(model_uri: str, config: ServeConfig = ServeConfig(), *, blocking: bool = False):
    """Start (or update) the sampler application on the local or ``RAY_ADDRESS`` cluster;
    returns the base URL."""
    from data import cluster

    cluster.ensure_ray()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(SamplerServer.options(**deployment_options(config, model_uri)).bind(), name=APP_NAME,
              route_prefix="/", blocking=blocking)
    return f"http://{config.host}:{config.port}"
