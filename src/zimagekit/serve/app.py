"""The HTTP side of ``zimagekit serve``: a web page, zimagekit's own job API with live progress,
and the two APIs image tools already call (A1111's ``/sdapi/v1`` and OpenAI's images API).

Every generation, whatever the endpoint, becomes one :class:`~zimagekit.serve.jobs.Job` on
the queue; its settings go through :class:`~zimagekit.request.GenerationRequest` (the
defaults and checks ``generate`` and the pipeline use) plus the server's limits, and a bad
field is a 400 with ``{"error": "...", "field": "..."}`` (FastAPI's own 422 for a field of the
wrong type). Nothing in a request names a path: LoRAs are names looked up in the configured
folder, images arrive as base64 and results leave as base64 or by job id.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from ..errors import ZImageKitError
from ..request import GenerationRequest
from .jobs import Job, JobQueue

STATIC = Path(__file__).parent / "static"
MAX_PENDING = 32  # jobs waiting or running; more get a 503
# How request errors name the settings of a GenerationRequest (zimagekit's API field names).
API_LABELS = {
    "width": "width", "height": "height", "num_inference_steps": "steps", "guidance_scale": "guidance_scale",
    "cfg_normalization": "cfg_normalization", "cfg_truncation": "cfg_truncation", "num_images_per_prompt": "n",
    "seed": "seed", "strength": "strength", "max_sequence_length": "max_sequence_length",
    "init_image": "init_image", "mask_image": "mask",
}


@dataclass
class Limits:
    """What one request may ask for (a shared server must not be asked for 100 4K images)."""

    max_side: int = 2048
    max_steps: int = 100
    max_images: int = 8
    max_prompt_chars: int = 4000


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


# -- request bodies (they are also the OpenAPI schema at /docs) ------------------------------


class LoraChoice(BaseModel):
    name: str = Field(description="a .safetensors file name in the server's LoRA folder")
    scale: float = Field(1.0, allow_inf_nan=False)


class GenerateBody(BaseModel):
    prompt: str
    negative_prompt: str = ""
    width: int | None = Field(None, description="default: the model's")
    height: int | None = None
    steps: int | None = Field(None, description="default: the model's")
    guidance_scale: float | None = Field(None, description="w in pos + w (pos - neg); default: the model's")
    seed: int = Field(-1, description="-1 picks one")
    n: int = Field(1, description="images")
    loras: list[LoraChoice] = []
    init_image: str | None = Field(None, description="base64 PNG/JPEG for img2img")
    mask: str | None = Field(None, description="base64 mask (white = redraw) for inpainting, with init_image")
    strength: float | None = None


class A1111Body(BaseModel):
    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = Field(None, description="A1111's CFG scale; zimagekit's guidance is cfg_scale - 1")
    width: int | None = None
    height: int | None = None
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = Field(None, description="ignored: Z-Image samples with Euler")
    init_images: list[str] | None = None
    mask: str | None = None
    denoising_strength: float | None = None


class OpenAIBody(BaseModel):
    prompt: str
    n: int = 1
    size: str | None = Field(None, description="WIDTHxHEIGHT, default the model's")
    response_format: str = Field("b64_json", description="only b64_json (no URLs are hosted)")
    model: str | None = Field(None, description="ignored: the server serves one model")


# -- the work ---------------------------------------------------------------------------------


class Generator:
    """The loaded pipeline and what a job needs from it."""

    def __init__(self, pipe, model_name: str, lora_dir: Path | None, limits: Limits, output_dir: Path | None):
        self.pipe, self.model_name, self.lora_dir, self.limits = pipe, model_name, lora_dir, limits
        self.output_dir = output_dir
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)

    def loras(self) -> list[str]:
        return sorted(p.name for p in self.lora_dir.glob("*.safetensors")) if self.lora_dir else []

    def _lora_path(self, name: str) -> Path:
        # Names only, from the listing: nothing a request says can point outside the folder.
        if name not in self.loras():
            raise ApiError(400, f"unknown LoRA {name!r}; available: {', '.join(self.loras()) or 'none'}", "loras")
        return self.lora_dir / name

    def plan(self, body: GenerateBody) -> Job:
        """Check everything, then the job that will draw the images."""
        from PIL import Image, UnidentifiedImageError

        limits = self.limits
        if not body.prompt.strip():
            raise ApiError(400, "prompt is empty", "prompt")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(body, name)) > limits.max_prompt_chars:
                raise ApiError(400, f"{name} is longer than this server's {limits.max_prompt_chars} characters", name)
        if body.n > limits.max_images:
            raise ApiError(400, f"n {body.n} is more than this server's {limits.max_images} images per request", "n")

        def image(field: str, data: str | None, mode: str):
            if data is None:
                return None
            try:
                raw = base64.b64decode(data.split(",", 1)[-1], validate=True)
                with Image.open(io.BytesIO(raw), formats=["PNG", "JPEG", "WEBP"]) as im:
                    if max(im.size) > limits.max_side:  # before decoding the pixels
                        raise ApiError(400, f"{field} is {im.size[0]}x{im.size[1]}, more than this server's "
                                            f"{limits.max_side} pixels a side", field)
                    return im.convert(mode)
            except (ValueError, OSError, UnidentifiedImageError, Image.DecompressionBombError):
                raise ApiError(400, f"{field} is not a base64-encoded PNG, JPEG or WebP image", field) from None

        init, mask = image("init_image", body.init_image, "RGB"), image("mask", body.mask, "L")
        seed = body.seed if body.seed >= 0 else random.SystemRandom().randrange(2**32)
        pipe = self.pipe
        try:
            request = GenerationRequest(
                width=body.width, height=body.height, num_inference_steps=body.steps,
                guidance_scale=body.guidance_scale, num_images_per_prompt=body.n, seed=seed,
                img2img=init is not None, inpaint=mask is not None, strength=body.strength,
            ).validate(API_LABELS).resolved(pipe.defaults, pipe.image_multiple, init.size if init else None)
        except ZImageKitError as e:
            raise ApiError(400, str(e), _field_of(str(e))) from None
        if mask is not None and mask.size != init.size:
            raise ApiError(400, f"the mask is {mask.size[0]}x{mask.size[1]} but init_image is "
                                f"{init.size[0]}x{init.size[1]}", "mask")
        for name, value in (("width", request.width), ("height", request.height)):
            if value > limits.max_side:
                raise ApiError(400, f"{name} {value} is more than this server's {limits.max_side} pixels", name)
        if request.num_inference_steps > limits.max_steps:
            raise ApiError(400, f"steps {request.num_inference_steps} is more than this server's {limits.max_steps}",
                           "steps")
        longest = pipe.transformer.config.axes_lens[0]
        from ..s3dit import max_caption_tokens

        for name in ("prompt", "negative_prompt"):
            text = getattr(body, name)
            if text and len(pipe.text_encoder.token_ids([text])[0]) > max_caption_tokens(longest):
                raise ApiError(400, f"{name} is too long for this model ({max_caption_tokens(longest)} tokens with the "
                                    "chat template)", name)
        loras = [(self._lora_path(c.name), c.scale) for c in body.loras]
        steps = request.num_inference_steps
        if init is not None:
            from ..sampling import img2img_start

            steps -= img2img_start(steps, request.strength)
        return Job(work=lambda job: self.run(job, body, request, init, mask, loras), steps=steps)

    def run(self, job: Job, body: GenerateBody, request: GenerationRequest, init, mask, loras) -> list[tuple[bytes, str]]:
        import torch

        from ..lora import LoRA
        from ..pngmeta import GenerationInfo, infotext, png_info

        attached = []
        try:
            for path, scale in loras:  # inside the try: a LoRA that fails leaves none attached
                attached.append(LoRA.load(self.pipe.transformer, path, scale))
            images = self.pipe(
                body.prompt, negative_prompt=body.negative_prompt or None, width=request.width, height=request.height,
                num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                num_images_per_prompt=request.num_images_per_prompt,
                generator=[torch.Generator("cpu").manual_seed(s) for s in request.image_seeds()],
                init_image=init, mask_image=mask, strength=request.strength if init is not None else None,
                callback=job.step, progress=False)
        finally:
            for lora in attached:
                lora.detach_from_model()
        out = []
        for k, (image, seed) in enumerate(zip(images, request.image_seeds())):
            info = GenerationInfo(
                prompt=body.prompt, negative_prompt=body.negative_prompt if request.guidance_scale > 0 else "",
                steps=request.num_inference_steps, cfg_scale=request.guidance_scale, seed=seed, width=request.width,
                height=request.height, model=self.model_name,
                strength=request.strength if init is not None else None, mask="(uploaded)" if mask is not None else None,
                loras=tuple(f"{path.stem}:{scale:g}" for path, scale in loras))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", pnginfo=png_info(info))
            png = buffer.getvalue()
            if self.output_dir is not None:  # names chosen here, never by the request
                (self.output_dir / f"{job.number:05d}-{job.id}-{k}-{seed}.png").write_bytes(png)
            out.append((png, infotext(info)))
        return out


def _field_of(message: str) -> str | None:
    first = message.split()[0] if message else None
    return next((label for label in API_LABELS.values() if label == first), None)


# -- the app ----------------------------------------------------------------------------------

OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect")
MAX_BODY = 64 * 2**20  # bytes of a request body: two base64 images at the largest allowed size fit


class Guard:
    """Plain ASGI middleware: the API key and a cap on the body's size, both checked before the
    body is read (a FastAPI dependency runs only after the body is parsed, and Starlette's HTTP
    middleware would hide a client's disconnect from the handlers that cancel its job)."""

    def __init__(self, app, api_key: str | None, max_body: int = MAX_BODY):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS:
            # Headers for API clients; ?key= for what a browser cannot add headers to (EventSource, <img>).
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
                     or query.get("key", [""])[0])
            if not secrets.compare_digest(given.encode(), self.api_key.encode()):
                response = JSONResponse({"error": "missing or wrong API key (Authorization: Bearer KEY, X-API-Key, "
                                         "or ?key=)", "field": None}, status_code=401)
                return await response(scope, receive, send)
        if int(headers.get("content-length") or 0) > self.max_body:
            response = JSONResponse({"error": f"the request body is larger than {self.max_body} bytes", "field": None},
                                    status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted():  # a body sent without a length is counted as it arrives
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise ApiError(413, f"the request body is larger than {self.max_body} bytes")
            return message

        return await self.app(scope, counted, send)


def create_app(generator: Generator, api_key: str | None = None, queue: JobQueue | None = None) -> FastAPI:
    """The ASGI app; ``queue`` is started here unless given (tests pass their own)."""
    from .. import __version__

    app = FastAPI(title="zimagekit", version=__version__, description="Z-Image generation: a web page, zimagekit's job "
                  "API with progress events, and A1111- and OpenAI-compatible endpoints.")
    jobs = queue or JobQueue().start()
    app.state.jobs, app.state.generator = jobs, generator

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return JSONResponse({"error": e.message, "field": e.field}, status_code=e.status)

    app.add_middleware(Guard, api_key=api_key)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": generator.model_name, "queue": len(jobs)}

    @app.get("/api/info")
    async def info():
        limits = generator.limits
        return {"model": generator.model_name, "defaults": generator.pipe.defaults, "loras": generator.loras(),
                "limits": limits.__dict__, "image_multiple": generator.pipe.image_multiple}

    @app.post("/api/jobs")
    async def submit(body: GenerateBody):
        job = await planned(body)
        return {"id": job.id, "position": jobs.position(job)}

    async def planned(body: GenerateBody) -> Job:
        """Check the request off the event loop (decoding an upload takes a while), then queue it."""
        job = await asyncio.to_thread(generator.plan, body)
        if len(jobs) >= MAX_PENDING:
            raise ApiError(503, f"the queue is full ({MAX_PENDING} jobs); try again later")
        return jobs.submit(job)

    def lookup(job_id: str) -> Job:
        job = jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)", "id")
        return job

    def status(job: Job) -> dict:
        out = {"id": job.id, "state": job.state, "position": jobs.position(job), "step": job.step_done,
               "steps": job.steps}
        if job.state == "done":
            out["images"] = [f"/api/jobs/{job.id}/images/{k}" for k in range(len(job.images))]
            out["infotexts"] = job.infotexts
        if job.error:
            out["error"] = job.error
        return out

    @app.get("/api/jobs/{job_id}")
    async def job_status(job_id: str):
        return status(lookup(job_id))

    @app.delete("/api/jobs/{job_id}")
    async def cancel(job_id: str):
        job = lookup(job_id)
        jobs.cancel(job)
        return status(job)

    @app.get("/api/jobs/{job_id}/images/{index}")
    async def job_image(job_id: str, index: int):
        job = lookup(job_id)
        if not 0 <= index < len(job.images):
            raise ApiError(404, f"job {job_id} has no image {index}", "index")
        return Response(job.images[index], media_type="image/png")

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str):
        """Server-sent events: the job's status whenever it changes; closing the stream before
        the job is over cancels it."""
        job = lookup(job_id)

        async def stream():
            last = None
            try:
                while True:
                    now = status(job)
                    if now != last:
                        yield f"data: {json.dumps(now)}\n\n"
                        last = now
                    if job.over:
                        return
                    await asyncio.sleep(0.05)
            finally:
                if not job.over:
                    jobs.cancel(job)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def finish(job: Job, request: Request) -> Job:
        """Wait for a job; a client that hangs up cancels it."""
        while not job.finished.is_set():
            if await request.is_disconnected():
                jobs.cancel(job)
                break
            await asyncio.sleep(0.05)
        if job.state == "error":
            raise ApiError(500, f"generation failed: {job.error}")
        if job.state == "cancelled":
            raise ApiError(499, "cancelled")
        return job

    @app.post("/sdapi/v1/txt2img")
    async def a1111_txt2img(body: A1111Body, request: Request):
        job = await finish(await planned(_from_a1111(body, img2img=False)), request)
        return _a1111_response(job, body)

    @app.post("/sdapi/v1/img2img")
    async def a1111_img2img(body: A1111Body, request: Request):
        job = await finish(await planned(_from_a1111(body, img2img=True)), request)
        return _a1111_response(job, body)

    @app.get("/sdapi/v1/sd-models")
    async def a1111_models():
        return [{"title": generator.model_name, "model_name": generator.model_name, "filename": generator.model_name}]

    @app.post("/v1/images/generations")
    async def openai_generations(body: OpenAIBody, request: Request):
        if body.response_format != "b64_json":
            raise ApiError(400, "response_format must be b64_json: this server hosts no image URLs", "response_format")
        width = height = None
        if body.size is not None:
            try:
                width, height = (int(v) for v in body.size.lower().split("x"))
            except ValueError:
                raise ApiError(400, f"size {body.size!r} is not WIDTHxHEIGHT, e.g. 1024x1024", "size") from None
        job = await finish(await planned(GenerateBody(prompt=body.prompt, n=body.n, width=width, height=height)),
                           request)
        return {"created": int(time.time()),
                "data": [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": body.prompt} for png in job.images]}

    return app


def _from_a1111(body: A1111Body, img2img: bool) -> GenerateBody:
    if img2img and not body.init_images:
        raise ApiError(400, "init_images is empty; img2img needs one image", "init_images")
    if not img2img and (body.init_images or body.mask):
        raise ApiError(400, "txt2img takes no init_images or mask; use /sdapi/v1/img2img", "init_images")
    guidance = None
    if body.cfg_scale is not None:
        if not math.isfinite(body.cfg_scale) or body.cfg_scale < 1:
            raise ApiError(400, f"cfg_scale must be >= 1 (1 = no guidance), got {body.cfg_scale}", "cfg_scale")
        guidance = body.cfg_scale - 1  # A1111's scale s is pos + (s - 1)(pos - neg)
    return GenerateBody(
        prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps, guidance_scale=guidance,
        width=body.width, height=body.height, seed=body.seed, n=body.batch_size * body.n_iter,
        init_image=body.init_images[0] if img2img else None, mask=body.mask if img2img else None,
        strength=body.denoising_strength if img2img else None)


def _a1111_response(job: Job, body: A1111Body) -> dict:
    return {"images": [base64.b64encode(png).decode() for png in job.images],
            "parameters": body.model_dump(exclude={"init_images", "mask"}),
            "info": json.dumps({"infotexts": job.infotexts})}
