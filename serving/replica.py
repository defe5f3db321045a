"""One replica of the Ray Serve sampler: the HTTP routes, request validation, and batching.

``POST /v1/generate``, ``POST /v1/interpolate`` (along the path between two seeds, labels or
prompts), ``POST /v1/edit`` (SDEdit), ``POST /v1/inpaint``, ``GET /v1/model``,
``GET /v1/versions``, ``GET /healthz``; the OpenAPI document is at ``/openapi.json``
(FastAPI). A request may name another ``version`` of the served model (a number or an
alias: ``candidate``), which the replica loads beside the one it follows and keeps (the
last :data:`OTHER_VERSIONS`), so two versions draw the same seeds side by side. Requests are
batched (:mod:`ldmflow.serving.batcher`: a batch is formed when the model is free, from
what queued meanwhile); those that can share a timestep schedule (same mode, sampler,
steps and edit strength) run as one sampler call, and both classifier-free guidance passes
of a batch run as one UNet call.

Everything a request carries is checked before it reaches a batch: malformed JSON, unknown
fields, out-of-range values, configured limits (steps, images, upload size and pixels), bad
base64, undecodable images, masks of the wrong size, labels the model does not have. Each
gets a 4xx whose ``error`` names the field; nothing a client sends can take a replica down.
The model itself sits in a :class:`~ldmflow.serving.follower.ModelSlot`, kept on its alias.
Requests, latency, batch sizes, images and the model version are Prometheus metrics
(:mod:`ldmflow.serving.metrics`).
"""

import asyncio
import time
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from ldmflow import configs
from ldmflow.data import jobs
from ldmflow.data.jobs import RequestError
from ldmflow.model.grids import png_base64
from ldmflow.model.sampling import batch_groups
from ldmflow.registry import gate, models
from ldmflow.registry.gate import PromotionConfig
from ldmflow.serving.batcher import Batcher
from ldmflow.serving.config import ServeConfig
from ldmflow.serving.follower import AliasFollower, Loaded, ModelSlot, load_model
from ldmflow.serving import auth
from ldmflow.serving.metrics import ServingMetrics
from ldmflow.serving.schemas import (
    DecisionResponse,
    EditRequest,
    ErrorBody,
    GenerateRequest,
    ImagesResponse,
    InpaintRequest,
    InterpolateRequest,
    ModelRef,
    PromoteRequest,
    RejectRequest,
    VersionsResponse,
)

KEY_DIGESTS = "api_key_sha256"  # the user_config entry with the API keys' digests
PROMOTE_KEY_DIGESTS = "promote_key_sha256"  # ... with the promotion keys' digests and who holds each
PROMOTION = "promotion"  # ... with the gate's config (the promote: section)
OTHER_VERSIONS = 2  # versions a replica keeps loaded beside the one it follows
PAGE = Path(__file__).with_name("page")  # the page served at /: HTML, CSS and JavaScript, no build step
PAGE_FILES = {"page.js": "text/javascript", "page.css": "text/css"}

api = FastAPI(title="ldmflow sampler", version="1",
              description="Generate, edit and inpaint images with a registered ldmflow latent diffusion model, "
                          "compare its versions and promote one. With keys configured, every route but /healthz "
                          "and the page needs `Authorization: Bearer KEY`; promoting and rejecting need a "
                          "promotion key.")
api.state.key_digests = ()
api.state.promote_digests = {}  # digest -> who holds the promotion key
api.state.metrics = None  # a replica's ServingMetrics

# The error body of every refused request, as the OpenAPI document describes it.
REFUSALS = {status: {"model": ErrorBody, "description": meaning} for status, meaning in (
    (401, "no valid API key"), (403, "a key that may not promote"), (409, "the model changed under the request"),
    (413, "an upload too large"), (422, "a field that cannot be used"))}


@api.middleware("http")
async def _authorize(request: Request, call_next):
    """Every route but /healthz needs a key when keys are configured (an API key or a
    promotion key); promoting and rejecting need a promotion key, always. Who holds it is
    ``request.state.who``."""
    state, path = request.app.state, request.url.path
    authorization = request.headers.get("authorization")
    who = auth.holder(authorization, state.promote_digests)
    request.state.who = who
    if path in auth.PROMOTE_PATHS and who is None:
        if auth.allowed(authorization, state.key_digests):
            return _refusal(403, "authorization: this key may draw but not promote: use a promotion key")
        return _refusal(401, "authorization: a promotion key (`Authorization: Bearer KEY`) is needed")
    if (state.key_digests or state.promote_digests) and path not in auth.OPEN_PATHS and who is None and not \
            auth.allowed(authorization, state.key_digests):
        return _refusal(401, "authorization: a valid `Authorization: Bearer KEY` header is needed")
    return await call_next(request)


def _refusal(status: int, error: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return JSONResponse({"error": error, "field": "authorization"}, status_code=status, headers=headers)


@api.middleware("http")  # added last, so outermost: refusals of every kind are counted too
async def _measure(request: Request, call_next):
    metrics: ServingMetrics | None = request.app.state.metrics
    if metrics is None:
        return await call_next(request)
    return await metrics.measure(request.url.path, lambda: call_next(request))


@api.exception_handler(RequestError)
async def _refused(_: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc), "field": exc.field}, status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    """Each problem by its field, never the request's content (it may be megabytes of base64)."""
    problems, fields = [], []
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            position = error.get("loc", ("body", "?"))[-1]
            problems.append(f"body: not valid JSON (at character {position})")
            fields.append("body")
            continue
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {error.get('msg')}")
        fields.append(where)
    return JSONResponse({"error": "; ".join(problems), "field": fields[0] if fields else "body"}, status_code=422)


@serve.deployment(name="SamplerServer")
@serve.ingress(api)
class SamplerServer:
    """One replica: the current model, a batcher, and a thread that follows the alias."""

    def __init__(self) -> None:
        self.metrics = api.state.metrics = ServingMetrics(
            lambda: {*api.openapi()["paths"], api.openapi_url, api.docs_url})
        self.slot = ModelSlot(on_change=lambda loaded: self.metrics.serving(loaded.name, loaded.version))
        self.config = ServeConfig()
        self.promotion = PromotionConfig()
        self._follower: AliasFollower | None = None
        self._batcher = Batcher(self._sample, self.config.max_batch_size, self.config.batch_wait_timeout_s)
        self.others: dict[str, Loaded] = {}  # other versions of the served model, by number, last used last
        self.inpainter: Loaded | None = None  # serve.inpainting_model: /v1/inpaint's model
        self._resolutions: dict[str, tuple[str, float]] = {}  # a request's version URI -> (number, when asked)
        self._loading = asyncio.Lock()

    @property
    def model(self) -> Loaded | None:
        return self.slot.loaded

    async def reconfigure(self, user_config: dict) -> None:
        """Apply ``{"model_uri": ..., **ServeConfig fields}``; a new model is loaded before
        the old one is let go."""
        fields = dict(user_config)
        uri = fields.pop("model_uri")
        api.state.key_digests = tuple(fields.pop(KEY_DIGESTS, ()))
        api.state.promote_digests = dict(fields.pop(PROMOTE_KEY_DIGESTS, {}))
        self.promotion = configs.from_dict(PromotionConfig, fields.pop(PROMOTION, {}))
        self.config = configs.from_dict(ServeConfig, fields)
        self._batcher.max_batch_size = self.config.max_batch_size
        self._batcher.wait_s = self.config.batch_wait_timeout_s
        if uri != self.slot.uri or self.model is None:
            self.slot.put(uri, await asyncio.to_thread(load_model, uri))
        wanted = self.config.inpainting_model
        if not wanted:
            self.inpainter = None
        elif self.inpainter is None or self.inpainter.uri != wanted:
            self.inpainter = await asyncio.to_thread(load_model, wanted)
        if self._follower is None and self.config.follow_seconds > 0 and "@" in uri:
            self._follower = AliasFollower(self.slot, lambda: self.config.follow_seconds)
            self._follower.start()

    # -- batching ---------------------------------------------------------------------

    async def _sample(self, items: list) -> list:
        """Run a batch of ``(job, model)`` items (:class:`~ldmflow.serving.batcher.Batcher`
        forms it when the previous one is done; model None: the one followed, read once, so a
        swap during the batch does not affect it). Each model's jobs run as sub-batches of
        those that share a timestep schedule (steps, sampler, mode)."""
        followed = self.model
        results: list = [None] * len(items)
        by_model: dict[int, tuple[Loaded, list[int]]] = {}
        for i, (_, model) in enumerate(items):
            model = model or followed
            by_model.setdefault(id(model), (model, []))[1].append(i)
        for model, indices in by_model.values():
            jobs = [items[i][0] for i in indices]
            for group in batch_groups(jobs):
                runnable = []
                for g in group:
                    try:
                        model.sampler.check(jobs[g])  # the model may have changed since validation
                        runnable.append(g)
                    except ValueError as exc:
                        results[indices[g]] = RequestError.of(exc, 409)
                if runnable:
                    images = await asyncio.to_thread(model.sampler.run, [jobs[g] for g in runnable])
                    self.metrics.sampled(jobs[runnable[0]].mode, len(runnable), sum(jobs[g].n for g in runnable))
                    for g, image in zip(runnable, images):
                        results[indices[g]] = (image, model, len(runnable))
        return results

    async def _respond(self, job, model: Loaded | None) -> ImagesResponse:
        outcome = await self._batcher((job, model))
        if isinstance(outcome, RequestError):
            raise outcome
        images, model, batch = outcome
        ref = ModelRef(name=model.name, version=model.version, uri=model.uri)
        return ImagesResponse(images=png_base64(images), seeds=job.seeds(), model=ref, batch=batch)

    async def _version(self, version: str | None) -> Loaded | None:
        """The model a request's ``version`` names: None (the one followed) when it names
        none or the version followed; else that version, loaded on first use and kept."""
        followed = self.model
        if version is None:
            return None
        if followed.name is None:
            raise RequestError("version", "this server serves a model folder, which has no other versions")
        uri = f"models:/{followed.name}/{version}" if version.isdigit() else f"models:/{followed.name}@{version}"
        number = await self._resolved(uri, followed.name, version)
        if number == followed.version:
            return None
        async with self._loading:  # one load of a version, however many requests ask for it at once
            if number not in self.others:
                self.others[number] = await asyncio.to_thread(load_model, f"models:/{followed.name}/{number}")
                while len(self.others) > OTHER_VERSIONS:
                    del self.others[next(iter(self.others))]
            self.others[number] = self.others.pop(number)  # last used last
            return self.others[number]

    async def _resolved(self, uri: str, name: str, version: str) -> str:
        """The version number ``uri`` names, asked of the registry at most once every
        ``follow_seconds`` per URI (an alias moves no faster than the server follows it)."""
        now = time.monotonic()
        known = self._resolutions.get(uri)
        if known is not None and now - known[1] < self.config.follow_seconds:
            return known[0]
        try:
            number = (await asyncio.to_thread(models.resolve_version, uri)).version
        except models.ModelNotFound:
            raise RequestError("version", f"{name} has no version or alias {version!r}") from None
        if len(self._resolutions) > 64:  # requests name few versions; bound it all the same
            self._resolutions.clear()
        self._resolutions[uri] = (number, now)
        return number

    # -- validation -------------------------------------------------------------------

    async def _job(self, body: GenerateRequest, uploads: bool = False, default: Loaded | None = None) -> ImagesResponse:
        """Draw what the body asks: built into a job for the version it names, or ``default``
        (None: the one followed) (:func:`ldmflow.data.jobs.build`, within this server's
        limits; with ``uploads``, decoded in a thread, off the event loop the replica's other
        requests share), then batched."""
        config = self.config
        limits = jobs.Limits(config.max_images, config.max_steps, config.max_image_bytes, config.max_image_pixels)
        fields = body.model_dump()
        version = fields.pop("version")
        model = await self._version(version) if version is not None else default
        sampler = (model or self.model).sampler
        if uploads:
            job = await asyncio.to_thread(jobs.build, sampler, fields, limits)
        else:
            job = jobs.build(sampler, fields, limits)
        return await self._respond(job, model)

    # -- routes -----------------------------------------------------------------------

    @api.post("/v1/generate", response_model=ImagesResponse, responses=REFUSALS)
    async def generate(self, body: GenerateRequest) -> ImagesResponse:
        """Draw ``n`` images for a label, a prompt, or unconditionally."""
        return await self._job(body)

    @api.post("/v1/interpolate", response_model=ImagesResponse, responses=REFUSALS)
    async def interpolate(self, body: InterpolateRequest) -> ImagesResponse:
        """``n`` images along the path from ``seed`` to ``to_seed`` (and ``label`` to ``to_label``,
        ``prompt`` to ``to_prompt``): the first equals ``seed`` drawn alone, the last ``to_seed``."""
        if body.to_seed is None and body.to_label is None and body.to_prompt is None:
            raise RequestError("to_seed", "give to_seed, to_label or to_prompt: where the path ends")
        return await self._job(body)

    @api.post("/v1/edit", response_model=ImagesResponse, responses=REFUSALS)
    async def edit(self, body: EditRequest) -> ImagesResponse:
        """``sdedit``: noise the image's latent to ``strength``, then denoise with the new
        condition; ``invert``: DDIM-invert it to its noise, then draw from that noise."""
        return await self._job(body, uploads=True)

    @api.post("/v1/inpaint", response_model=ImagesResponse, responses=REFUSALS)
    async def inpaint(self, body: InpaintRequest) -> ImagesResponse:
        """Keep the image where the mask is black; generate where it is white: with the
        server's inpainting model (``serve.inpainting_model``) unless the body names a
        ``version``, else zero-shot with RePaint's resampling (``jump_length``, ``jump_count``)."""
        return await self._job(body, uploads=True, default=self.inpainter)

    @api.get("/v1/model", responses={401: REFUSALS[401]})
    async def model_info(self) -> dict:
        """Which model this replica serves: name, version, alias, lineage, conditioning, limits."""
        model = self.model
        info = model.sampler.info
        alias = model.uri.split("@", 1)[1] if "@" in model.uri else None
        return {
            "uri": model.uri, "name": model.name, "version": model.version, "alias": alias,
            "conditioning": info.conditioning, "class_names": info.class_names, "resolution": info.resolution,
            "defaults": asdict(info.defaults), "lineage": {**info.lineage, "autoencoder": info.autoencoder},
            "tags": model.tags, "loaded_at": model.loaded_at, "inpainting": info.inpainting,
            "label_reader": info.label_reader,
            "inpainting_model": None if self.inpainter is None else {
                "uri": self.inpainter.uri, "name": self.inpainter.name, "version": self.inpainter.version},
            "limits": {"max_steps": self.config.max_steps, "max_images": self.config.max_images,
                       "max_image_bytes": self.config.max_image_bytes,
                       "max_image_pixels": self.config.max_image_pixels},
        }

    @api.get("/v1/versions", response_model=VersionsResponse, responses={401: REFUSALS[401]})
    async def versions(self) -> VersionsResponse:
        """Every version of the served model, newest first, with its aliases, evaluation scores
        and lineage tags: what a request's ``version`` may name."""
        name = self.model.name
        if name is None:
            return VersionsResponse(name=None, versions=[])
        return VersionsResponse(name=name, versions=await asyncio.to_thread(models.describe_versions, name))

    @api.post("/v1/promote", response_model=DecisionResponse, responses=REFUSALS)
    async def promote(self, body: PromoteRequest, request: Request) -> DecisionResponse:
        """Move ``production`` to ``version`` behind the promotion gate (the server's ``promote:``
        config), on the evaluations recorded for it and for production: as ``ldmflow promote``
        does, and recorded the same way, with the key holder and ``reason``. A version not
        better is refused (``promoted: false``) unless ``force``; one never evaluated is a 409."""
        who = request.state.who
        decision = await self._decide(lambda name: gate.promote_recorded(
            name, body.version, self.promotion, force=body.force, who=who, why=body.reason))
        return DecisionResponse(**vars(decision), by=who)

    @api.post("/v1/reject", response_model=DecisionResponse, responses=REFUSALS)
    async def reject(self, body: RejectRequest, request: Request) -> DecisionResponse:
        """Record that the key holder refused ``version``, and why; no alias moves."""
        who = request.state.who
        decision = await self._decide(lambda name: gate.reject(name, body.version, who=who, why=body.reason))
        return DecisionResponse(**vars(decision), by=who)

    async def _decide(self, decide) -> gate.Decision:
        name = self.model.name
        if name is None:
            raise RequestError("version", "this server serves a model folder, which has no versions to promote")
        try:
            return await asyncio.to_thread(decide, name)
        except gate.GateError as exc:
            raise RequestError("version", str(exc), 409) from None
        except gate.RegistryError as exc:
            raise RequestError("version", str(exc)) from None

    @api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The page to look before promoting (compare, draw and edit, promote or reject)."""
        return HTMLResponse((PAGE / "index.html").read_text())

    @api.get("/page/{name}", include_in_schema=False)
    async def page_file(self, name: str) -> Response:
        if name not in PAGE_FILES:
            return JSONResponse({"error": f"path: no page file {name!r}", "field": "path"}, status_code=404)
        return Response((PAGE / name).read_bytes(), media_type=PAGE_FILES[name])

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Up, with the model it serves, and whether the other routes need a key."""
        return {"status": "ok", "model": self.model.uri, "version": self.model.version,
                "keys": bool(api.state.key_digests or api.state.promote_digests)}


