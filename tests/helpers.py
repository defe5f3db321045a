"""Small real images of every awkward kind, made on the fly (nothing is downloaded), and a
Prometheus scrape of ldmflow's metrics."""

from __future__ import annotations

import io
import urllib.request

import numpy as np
from PIL import Image


def training_config(cls, **fields):
    """A training stage's config (``DiffusionConfig``, ``AutoencoderConfig``) from flat fields,
    those of its ``ray_train:`` section (workers, checkpoint cadence, loader…) put there; a
    diffusion config trains no label reader unless ``label_reader_steps`` is given."""
    import dataclasses

    from ldmflow.training.stage_configs import DiffusionConfig, RayTrainConfig

    if cls is DiffusionConfig:  # a class model's label reader only where a test asks for one: minutes saved
        fields.setdefault("label_reader_steps", 0)
    ray_train = {f.name: fields.pop(f.name) for f in dataclasses.fields(RayTrainConfig) if f.name in fields}
    return cls(**fields, ray_train=RayTrainConfig(**ray_train))


def with_ray_train(config, **fields):
    """``config`` with fields of its ``ray_train:`` section changed."""
    import dataclasses

    return dataclasses.replace(config, ray_train=dataclasses.replace(config.ray_train, **fields))


def pattern(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB test pattern with distinct quadrants (orientation is visible)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)  # top-left red
    return image


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def png(width: int = 16, height: int = 16, seed: int = 0) -> bytes:
    return encode(Image.fromarray(pattern(width, height, seed)))


def jpeg_with_orientation(width: int, height: int, orientation: int) -> bytes:
    """A JPEG whose EXIF says to rotate it (6: 90° clockwise)."""
    image = Image.fromarray(pattern(width, height))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def rgba_transparent(size: int = 16) -> bytes:
    image = Image.new("RGBA", (size, size), (0, 0, 255, 0))  # fully transparent blue
    return encode(image)


def palette_with_transparency(size: int = 16) -> bytes:
    image = Image.new("P", (size, size), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    return encode(image, transparency=0)


def gray16(size: int = 16, value: int = 65535) -> bytes:
    return encode(Image.fromarray(np.full((size, size), value, dtype=np.uint16)))


def cmyk_jpeg(size: int = 16) -> bytes:
    return encode(Image.new("CMYK", (size, size), (0, 255, 255, 0)), "JPEG", quality=95)


def animated_gif(size: int = 16) -> bytes:
    frames = [Image.new("P", (size, size), i) for i in range(3)]
    for frame in frames:
        frame.putpalette([255, 255, 255, 255, 0, 0, 0, 255, 0] + [0] * 759)
    out = io.BytesIO()
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return out.getvalue()


def bomb_png(side: int = 12_000) -> bytes:
    """A tiny file that claims a huge image (1-bit, compresses to almost nothing)."""
    return encode(Image.new("1", (side, side), 0), optimize=True)


def truncated_png() -> bytes:
    data = png(64, 64, seed=3)
    return data[: len(data) // 2]


def tiny_diffusion_parts(work_dir, conditioning: str = "class", seed: int = 0, resolution: int = 16,
                         inpainting: bool = False):
    """(UNet, autoencoder, autoencoder folder, ModelInfo) with random tiny weights, made in about
    a second: enough for everything sampling promises that does not need a trained model
    (``inpainting``: a UNet with an inpainting model's extra input channels)."""
    import torch

    from ldmflow.model import autoencoders, unets
    from ldmflow.training.stage_configs import DiffusionConfig, model_info

    torch.manual_seed(seed)
    vae = autoencoders.build("tiny", resolution).eval()
    vae_folder = work_dir / f"autoencoder-{seed}"
    vae_info = autoencoders.save(vae, vae_folder, scale_factor=0.8, resolution=resolution, config={}, lineage={})
    latent_shape = vae_info.latent_shape()
    classes = [str(i) for i in range(10)] if conditioning == "class" else None
    network = unets.build("tiny", conditioning, latent_shape, len(classes or ()), inpainting=inpainting).eval()
    config = DiffusionConfig(conditioning=conditioning, sample_steps=4, guidance=2.0, inpainting=inpainting)
    info = model_info(config, latent_shape, classes, 0.8, vae,
                      autoencoder={"uri": str(vae_folder), "weights_sha256": vae_info.weights_sha256, "scale_factor": 0.8},
                      lineage={"run_id": "test"})
    return network, vae, vae_folder, info


def tiny_diffusion_model(folder, conditioning: str = "class", seed: int = 0, resolution: int = 16,
                         inpainting: bool = False):
    """A complete model folder (ldmflow.model.model_format) with random tiny weights."""
    from ldmflow.model import model_format

    network, _, vae_folder, info = tiny_diffusion_parts(folder.parent, conditioning, seed, resolution, inpainting)
    model_format.save(folder, network, vae_folder, info)
    return folder


def scrape(targets: list[str], prefix: str = "ray_ldmflow_") -> dict[tuple, float]:
    """The samples named ``prefix…`` on Prometheus endpoints ``host:port``, as a scrape would
    see them: (name, sorted ldmflow labels) → value, summed over Ray's own labels (replica,
    worker, node)."""
    from prometheus_client.parser import text_string_to_metric_families

    kept = ("route", "status", "mode", "model", "le")
    samples: dict[tuple, float] = {}
    for target in targets:
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
            for family in text_string_to_metric_families(response.read().decode()):
                if not family.name.startswith(prefix):
                    continue
                for sample in family.samples:
                    key = (sample.name, tuple(sorted((k, v) for k, v in sample.labels.items() if k in kept)))
                    samples[key] = samples.get(key, 0.0) + sample.value
    return samples


def encoder_at_work() -> int | None:
    """The pid of a precompute encoder actor encoding a shard (Ray titles the process by its
    actor and method: Ray Data's MapWorker running LatentEncoder), or None."""
    from pathlib import Path

    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::MapWorker(Map(LatentEncoder)).submit"):
                return int(cmdline.parent.name)
        except OSError:
            continue
    return None


def wait_until(condition, timeout: float, what: str, poll: float = 0.05) -> None:
    """Return as soon as ``condition()`` holds; fail naming ``what`` if it does not within
    ``timeout`` seconds (a test waits on what it needs, never for a guessed time)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


class CountingProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that counts the requests every
    thread and process sends, by kind (``ListObjectsV2``, ``GetObject``, ``PutObject``…).
    Point ``AWS_ENDPOINT_URL`` at :attr:`endpoint` while it runs."""

    def __init__(self, upstream: str) -> None:
        import collections
        import http.client
        import http.server
        import threading
        import urllib.parse

        self.counts: collections.Counter[str] = collections.Counter()
        self.read: list[str] = []  # the key of each GetObject, in order
        lock = threading.Lock()
        target = urllib.parse.urlsplit(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                """Quiet: the counts are the record."""

            def forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    kind = proxy.kind(self.command, self.path)
                    proxy.counts[kind] += 1
                    if kind == "GetObject":
                        proxy.read.append(urllib.parse.unquote(self.path.partition("?")[0]))
                upstream_conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream_conn.request(self.command, self.path, body=body, headers=headers)
                response = upstream_conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length or "0")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream_conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def kind(method: str, path: str) -> str:
        where, _, query = path.partition("?")
        if method == "GET" and "/" not in where.strip("/"):  # the bucket itself
            return "ListObjectsV2" if "list-type=2" in query else "ListObjects"
        if method == "GET":
            return "GetObject"
        return {"HEAD": "HeadObject", "PUT": "PutObject", "DELETE": "DeleteObject",
                "POST": "DeleteObjects" if "delete" in query else "Post"}.get(method, method)

    def take(self) -> dict[str, int]:
        """The counts so far, reset (and the keys read)."""
        counts, self.counts, self.read = dict(self.counts), type(self.counts)(), []
        return counts

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


CHROMIUM_MISSING = "no system chromium and chromedriver (make test installs them as root)"


def chromium_available() -> bool:
    import shutil

    return shutil.which("chromium") is not None and shutil.which("chromedriver") is not None


def chromium():
    """The system's Chromium, headless, driven through the packaged chromedriver by Selenium
    (nothing downloaded); its console kept for :meth:`get_log`."""
    import os
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager fetches nothing: the paths are given
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,1600"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    driver.set_script_timeout(60)
    return driver


def page_images(driver, where: str) -> list[str]:
    """The data URLs of the images the page shows in element ``where``."""
    return [img.get_attribute("src") for img in driver.find_elements("css selector", f"#{where} img")]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, path: str, body=None, raw: bytes | None = None, method: str | None = None, timeout: float = 60,
         authorization: str | None = None):
    """(status, JSON body) of an HTTP request to ``url + path``: ``body`` as JSON, or ``raw``
    bytes; a refusal's body too (``{"error": text}`` when it is not JSON)."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"error": text.decode(errors="replace")}


def random_unet_copy(folder, dest):
    """The model in ``folder`` with an untrained UNet, copied to ``dest``: a clearly worse candidate."""
    import shutil

    import torch

    from ldmflow.model import model_format, unets

    info = model_format.read_info(folder)
    shutil.copytree(folder, dest)
    torch.manual_seed(123)
    fresh = unets.build("tiny", info.conditioning, tuple(info.latent_shape), len(info.class_names))
    fresh.save_pretrained(dest / model_format.UNET, safe_serialization=True)
    return dest
