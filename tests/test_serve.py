"""``zimagekit serve`` driven as a user drives it: a real server on a free loopback port, a real
HTTP client, both APIs, bad requests, two concurrent jobs, cancellation, API keys, and a
headless Chromium that fills the page's prompt, clicks Generate and waits for the picture."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from argparse import Namespace
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from zimagekit.cli.serve import build
from zimagekit.cli.serve import main as serve_main
from zimagekit.shipped import SHIPPED_MODELS

TURBO = SHIPPED_MODELS / "shapes-turbo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread, stopped on exit."""

    def __init__(self, app):
        import uvicorn

        self.app, self.port = app, free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_):
        self.server.should_exit = True
        self.thread.join(10)


def args(tmp_path, **overrides) -> Namespace:
    values = dict(model=TURBO, lora_dir=tmp_path / "loras", output_dir=tmp_path / "out", dtype="fp32", device="cpu",
                  max_side=256, max_steps=100, max_images=4, api_key=None)
    values.update(overrides)
    return Namespace(**values)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The shipped Turbo behind the server, with one LoRA in its folder."""
    from zimagekit.lora import LoRA
    from zimagekit.pipeline import ZImagePipeline

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "loras").mkdir()
    transformer = ZImagePipeline.from_pretrained(TURBO).transformer
    lora = LoRA.create(transformer, rank=2)
    with torch.no_grad():
        for p in lora.B.values():
            p.normal_(0, 0.5)
    lora.save(tmp / "loras" / "style.safetensors")
    app = build(args(tmp))
    with Server(app) as url:
        yield url, app, tmp


def png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_health_docs_and_the_page(served):
    url, _, _ = served
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "model": "shapes-turbo", "queue": 0}
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert {"/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/images/generations", "/api/jobs"} <= set(paths)
    page = httpx.get(url).text
    assert "<title>zimagekit</title>" in page and 'name="viewport"' in page
    info = httpx.get(f"{url}/api/info").json()
    assert info["loras"] == ["style.safetensors"] and info["defaults"]["width"] == 64


def test_a1111_txt2img_gives_the_pipelines_image_with_its_metadata(served):
    from zimagekit.pipeline import ZImagePipeline

    url, _, tmp = served
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "seed": 11, "cfg_scale": 1, "steps": 8},
                   timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    image = png(body["images"][0])
    expected = ZImagePipeline.from_pretrained(TURBO)("a red circle", seed=11, progress=False)[0]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    assert "Seed: 11" in image.text["parameters"] and "Seed: 11" in json.loads(body["info"])["infotexts"][0]
    assert list((tmp / "out").glob("*-11.png"))  # saved under a name the server chose


def test_a1111_img2img_with_a_mask_and_openai_generations(served):
    url, _, _ = served
    # an image of the model's own world, which its VAE reproduces closely
    init = png(httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a blue square", "seed": 1}, timeout=60)
               .json()["images"][0]).convert("RGB")
    mask = Image.new("L", (64, 64))
    mask.paste(255, (32, 0, 64, 64))
    r = httpx.post(f"{url}/sdapi/v1/img2img", json={"prompt": "a red circle", "init_images": [b64_png(init)],
                                                   "mask": b64_png(mask), "denoising_strength": 1.0}, timeout=60)
    assert r.status_code == 200, r.text
    out = np.asarray(png(r.json()["images"][0]).convert("RGB"), dtype=int)
    assert np.abs(out[:, :28] - np.asarray(init, dtype=int)[:, :28]).max() < 16  # the kept half stays
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "two green triangles", "n": 2, "size": "64x48"},
                   timeout=60)
    assert r.status_code == 200, r.text
    assert [png(d["b64_json"]).size for d in r.json()["data"]] == [(64, 48), (64, 48)]


@pytest.mark.parametrize("endpoint,body,status,field", [
    ("/api/jobs", {"prompt": "x", "width": 1000}, 400, "width"),
    ("/api/jobs", {"prompt": "x", "width": 512}, 400, "width"),  # above --max-side 256
    ("/api/jobs", {"prompt": "x", "steps": 101}, 400, "steps"),
    ("/api/jobs", {"prompt": "x", "n": 5}, 400, "n"),
    ("/api/jobs", {"prompt": "   "}, 400, "prompt"),
    ("/api/jobs", {"prompt": "x", "guidance_scale": -1}, 400, "guidance_scale"),
    ("/api/jobs", {"prompt": "x", "loras": [{"name": "../../etc/passwd"}]}, 400, "loras"),
    ("/api/jobs", {"prompt": "x", "init_image": "not base64!"}, 400, "init_image"),
    ("/api/jobs", {"prompt": "x", "strength": 0.5}, 400, "strength"),
    ("/api/jobs", {"prompt": "a circle " * 200}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, 400, "response_format"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, 400, "size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": 0.5}, 400, "cfg_scale"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, 400, "init_images"),
])  # fmt: skip
def test_bad_requests_name_the_field(served, endpoint, body, status, field):
    url, _, _ = served
    r = httpx.post(url + endpoint, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and field.split("_")[0].rstrip("s") in r.json()["error"].lower()


def test_a_wrongly_typed_field_is_a_422_naming_it(served):
    url, _, _ = served
    r = httpx.post(f"{url}/api/jobs", json={"prompt": "x", "width": "wide"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "width"]


def test_two_concurrent_jobs_queue_and_a_lora_is_applied_by_name(served):
    url, app, _ = served
    slow = {"prompt": "a red circle", "steps": 100, "seed": 1}
    first = httpx.post(f"{url}/api/jobs", json=slow).json()
    second = httpx.post(f"{url}/api/jobs", json={**slow, "steps": 8, "loras": [{"name": "style.safetensors"}]}).json()
    assert first["position"] == 0 and second["position"] == 1  # one waits for the other
    events = []
    with httpx.stream("GET", f"{url}/api/jobs/{second['id']}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    states = [e["state"] for e in events]
    assert states[0] == "queued" and states[-1] == "done" and "running" in states
    assert max(e["step"] for e in events) == 8
    first_status = httpx.get(f"{url}/api/jobs/{first['id']}").json()
    assert first_status["state"] == "done"  # it ran first
    with_lora = np.asarray(Image.open(io.BytesIO(httpx.get(url + events[-1]["images"][0]).content)), dtype=int)
    plain = np.asarray(png(httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 8,
                                                                         "seed": 1}, timeout=60).json()["images"][0]))
    assert np.abs(with_lora - plain.astype(int)).max() > 10
    assert not any(m._forward_hooks for m in app.state.generator.pipe.transformer.modules())  # LoRA detached


def test_a_client_that_disconnects_cancels_its_job_and_delete_cancels_a_queued_one(served):
    url, app, _ = served
    jobs = app.state.jobs
    blocker = httpx.post(f"{url}/api/jobs", json={"prompt": "a red circle", "steps": 100}).json()
    queued = httpx.post(f"{url}/api/jobs", json={"prompt": "a red circle", "steps": 100}).json()
    assert httpx.delete(f"{url}/api/jobs/{queued['id']}").json()["state"] == "cancelled"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 100}, timeout=0.5)
    deadline = time.time() + 60
    while jobs.get(blocker["id"]).state != "done" and time.time() < deadline:
        time.sleep(0.05)
    gone = jobs.all()[-1]  # the sync request's job
    while not gone.over and time.time() < deadline:
        time.sleep(0.05)
    assert gone.state == "cancelled" and gone.step_done < 100


def test_an_api_key_is_required_when_set_and_wide_binds_need_one(tmp_path, capsys):
    app = build(args(tmp_path, lora_dir=None, output_dir=None, api_key="s3cret"))
    with Server(app) as url:
        assert httpx.get(f"{url}/api/info").status_code == 401
        assert httpx.get(f"{url}/api/info", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(f"{url}/api/info?key=s3cret").status_code == 200
        assert httpx.get(url).status_code == 200 and httpx.get(f"{url}/health").status_code == 200
    assert serve_main(["--host", "0.0.0.0"]) == 2
    assert "exposes the server to the network; pass --api-key" in capsys.readouterr().err


def _chromium() -> str:
    import shutil

    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert path, "no Chromium: .ci/run installs Debian's chromium package (apt-get install chromium)"
    return path


def test_the_page_in_a_headless_browser(served, tmp_path):
    """Chromium loads the page, the test types a prompt and clicks Generate through the DevTools
    protocol, waits for the result image, and keeps a screenshot that must show it."""
    import asyncio
    import subprocess

    import websockets

    url, _, _ = served
    port = free_port()
    browser = subprocess.Popen([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                                f"--remote-debugging-port={port}", f"--user-data-dir={tmp_path / 'profile'}",
                                "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json").json()
                page = next(t for t in targets if t["type"] == "page")
                break
            except (httpx.HTTPError, StopIteration):
                assert time.time() < deadline, "Chromium did not start"
                time.sleep(0.2)

        async def drive() -> bytes:
            async with websockets.connect(page["webSocketDebuggerUrl"], max_size=2**25) as ws:
                ids = iter(range(1, 10**6))

                async def call(method, **params):
                    n = next(ids)
                    await ws.send(json.dumps({"id": n, "method": method, "params": params}))
                    while True:
                        reply = json.loads(await ws.recv())
                        if reply.get("id") == n:
                            return reply.get("result", {})

                async def js(expression):
                    result = await call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
                    return result.get("result", {}).get("value")

                await call("Page.enable")
                # a phone's viewport: the page must work at that width
                await call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=1, mobile=True)
                await call("Page.navigate", url=url)
                for _ in range(200):
                    if await js("document.getElementById('model').textContent.includes('shapes-turbo')"):
                        break
                    await asyncio.sleep(0.1)
                # a fixed seed: the picture is then the same every run (seed 42 draws a yellow circle)
                await js("document.getElementById('prompt').value = 'a yellow circle'; "
                         "document.getElementById('seed').value = 42; "
                         "document.getElementById('generate').click(); true")
                for _ in range(600):
                    if await js("(() => { const i = document.querySelector('#gallery img'); "
                                "return !!(i && i.complete && i.naturalWidth > 0); })()"):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"no image appeared; status: {await js('document.body.innerText')}")
                assert "a yellow circle" in await js("document.querySelector('#gallery figcaption').textContent")
                assert await js("document.documentElement.scrollWidth <= 390")  # nothing wider than the phone
                await js("document.querySelector('#gallery img').scrollIntoView(); true")
                await asyncio.sleep(0.2)
                shot = await call("Page.captureScreenshot", format="png")
                return base64.b64decode(shot["data"]), await js("document.querySelector('#gallery img').src")

        screenshot, image_url = asyncio.run(drive())
    finally:
        browser.terminate()
        browser.wait(10)
    path = tmp_path / "page.png"
    path.write_bytes(screenshot)
    shown = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    assert shown.shape[1] == 390 and shown.std() > 5  # a rendered page, not a blank one
    # the result is on screen: the served image's object colour covers many screen pixels
    result = np.asarray(Image.open(io.BytesIO(httpx.get(image_url).content)).convert("RGB"), dtype=int)
    assert "Seed: 42" in Image.open(io.BytesIO(httpx.get(image_url).content)).text["parameters"]
    saturation = result.max(-1) - result.min(-1)
    colour = result.reshape(-1, 3)[saturation.argmax()]  # the most saturated pixel: the drawn object
    assert saturation.max() > 100
    assert (np.abs(shown - colour).sum(-1) < 60).sum() > 50



def test_a_lora_that_fails_to_load_leaves_none_attached(served):
    url, app, tmp = served
    from safetensors.torch import save_file

    bad = tmp / "loras" / "other-model.safetensors"
    save_file({"lora_unet_layers_99_attention_to_q.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_layers_99_attention_to_q.lora_up.weight": torch.zeros(8, 2)}, str(bad))
    try:
        job = httpx.post(f"{url}/api/jobs", json={"prompt": "a red circle", "loras": [
            {"name": "style.safetensors"}, {"name": "other-model.safetensors"}]}).json()
        deadline = time.time() + 60
        while (status := httpx.get(f"{url}/api/jobs/{job['id']}").json())["state"] not in ("done", "error"):
            assert time.time() < deadline
            time.sleep(0.05)
        assert status["state"] == "error" and "another model" in status["error"]
        assert not any(m._forward_hooks for m in app.state.generator.pipe.transformer.modules())
    finally:
        bad.unlink()


def test_the_guard_refuses_big_bodies_and_missing_keys_before_reading_them():
    import asyncio

    from fastapi import FastAPI

    from zimagekit.serve.app import Guard

    inner = FastAPI()
    reached = []

    @inner.post("/echo")
    async def echo(body: dict):
        reached.append(body)
        return body

    async def run():
        transport = httpx.ASGITransport(app=Guard(inner, api_key="k", max_body=100))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            no_key = await client.post("/echo", json={"a": 1})
            big = await client.post("/echo", json={"a": "x" * 200}, headers={"X-API-Key": "k"})
            fine = await client.post("/echo", json={"a": 1}, headers={"X-API-Key": "k"})
            return no_key.status_code, big.status_code, fine.status_code

    assert asyncio.run(run()) == (401, 413, 200)
    assert reached == [{"a": 1}]  # only the request that passed both checks reached the handler
