"""The Ray Serve sampler over real HTTP on 127.0.0.1: generation, editing and inpainting,
dynamic batching of concurrent requests, 4xx for every malformed request, and a promotion
picked up without a failed request."""

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from ldmflow.registry import models, tracking
from ldmflow.serving import app
from tests import helpers

NAME = "serve-test"
KEY = "test-key-0123456789abcdefghijklmnop"  # the server below is configured with it
PROMOTE_KEY = "promote-key-0123456789abcdefghijkl"  # ... and with this promotion key, held by "ana"


free_port = helpers.free_port


@pytest.fixture(scope="module")
def server(digits_model, inpainting_model, tmp_path_factory):
    from ray import serve

    run = tracking.client().create_run(tracking.experiment_id("test-serving")).info.run_id
    version = models.register(digits_model.folder, NAME, run).version
    tracking.client().set_registered_model_alias(NAME, "production", version)
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text(f"# the test client's key\n{KEY}\n")
    promote_keys = keys.parent / "promote-keys"
    promote_keys.write_text(f"ana:{PROMOTE_KEY}\n")
    config = app.ServeConfig(port=free_port(), num_cpus=0.5, follow_seconds=0.5, max_batch_size=8,
                             batch_wait_timeout_s=0.05, max_steps=50, max_images=8, max_image_bytes=50_000,
                             max_image_pixels=1_000_000, api_keys_file=str(keys), promote_keys_file=str(promote_keys),
                             inpainting_model=inpainting_model.model_uri)
    url = app.run(f"models:/{NAME}@production", config)
    yield url
    serve.shutdown()


def call(*args, authorization: str | None = f"Bearer {KEY}", **kwargs):
    """:func:`tests.helpers.call` with the test client's API key unless told otherwise."""
    return helpers.call(*args, authorization=authorization, **kwargs)


def pixels(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB")).astype(int)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_generate_same_seed_same_images(server):
    status, first = call(server, "/v1/generate", {"label": 3, "n": 2, "seed": 11, "steps": 10})
    assert status == 200, first
    assert first["seeds"] == [11, 12] and first["model"] == {"name": NAME, "version": "1", "uri": f"models:/{NAME}@production"}
    assert pixels(first["images"][0]).shape == (16, 16, 3)
    _, again = call(server, "/v1/generate", {"label": 3, "n": 1, "seed": 12, "steps": 10})
    assert np.abs(pixels(again["images"][0]) - pixels(first["images"][1])).max() <= 1


def test_concurrent_requests_are_batched_and_keep_their_seeds(server):
    bodies = [{"label": i % 10, "n": 1, "seed": 100 + i, "steps": 8, "sampler": "dpm++"} for i in range(16)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda body: call(server, "/v1/generate", body), bodies))
    assert all(status == 200 for status, _ in results), results
    assert max(body["batch"] for _, body in results) > 1  # concurrent requests shared UNet calls
    for body, (_, batched) in list(zip(bodies, results))[:4]:  # the same image as alone
        _, alone = call(server, "/v1/generate", body)
        assert alone["batch"] == 1
        assert np.abs(pixels(alone["images"][0]) - pixels(batched["images"][0])).max() <= 1


def test_edit_and_inpaint(server):
    _, source = call(server, "/v1/generate", {"label": 1, "seed": 5, "steps": 10})
    image = source["images"][0]
    status, unchanged = call(server, "/v1/edit", {"image": image, "strength": 0.0, "label": 7})
    assert status == 200, unchanged
    # Strength 0 is the autoencoder's reconstruction of the input: close, not equal.
    assert np.abs(pixels(unchanged["images"][0]) - pixels(image)).mean() < 40
    _, edited = call(server, "/v1/edit", {"image": image, "strength": 0.9, "label": 7, "seed": 1, "steps": 10})
    assert np.abs(pixels(edited["images"][0]) - pixels(unchanged["images"][0])).mean() > 1
    # Inverted to its noise and drawn again under its own label: close to the reconstruction.
    status, again = call(server, "/v1/edit", {"image": image, "mode": "invert", "source_label": 1, "label": 1,
                                              "guidance": 1.0, "steps": 50})
    assert status == 200, again
    error = (pixels(again["images"][0]) - pixels(unchanged["images"][0])) / 127.5
    assert 10 * np.log10(4 / max((error ** 2).mean(), 1e-12)) > 20  # PSNR in dB
    _, other = call(server, "/v1/edit", {"image": image, "mode": "invert", "source_label": 1, "label": 7,
                                         "guidance": 1.0, "steps": 50})
    assert np.abs(pixels(other["images"][0]) - pixels(again["images"][0])).mean() > 1

    mask = np.zeros((16, 16), np.uint8)
    mask[:, 8:] = 255
    status, filled = call(server, "/v1/inpaint", {"image": image, "mask": b64(helpers.encode(Image.fromarray(mask))),
                                                  "label": 4, "n": 2, "seed": 3, "steps": 10})
    assert status == 200, filled
    assert filled["model"]["name"] == "test-inpainting"  # serve.inpainting_model draws it
    band = 2  # the feathered band beside the mask
    for result in filled["images"]:
        assert (pixels(result)[:, : 8 - band] == pixels(image)[:, : 8 - band]).all()  # the kept half, exactly
    assert np.abs(pixels(filled["images"][0])[:, 8:] - pixels(image)[:, 8:]).mean() > 1
    # Naming a version: that version, zero-shot, with RePaint's resampling as asked.
    status, zero_shot = call(server, "/v1/inpaint", {"image": image, "mask": b64(helpers.encode(Image.fromarray(mask))),
                                                     "label": 4, "seed": 3, "steps": 10, "version": "production",
                                                     "jump_length": 2, "jump_count": 2})
    assert status == 200 and zero_shot["model"]["name"] == NAME, zero_shot
    assert (pixels(zero_shot["images"][0])[:, : 8 - band] == pixels(image)[:, : 8 - band]).all()
    _, model = call(server, "/v1/model", method="GET")
    assert model["inpainting"] is False and model["inpainting_model"]["name"] == "test-inpainting"
    assert model["label_reader"] is True  # the digits model is trained with one
    # A noisy image restored at the strength its noise asks for.
    noisy = np.clip(pixels(image) + np.random.default_rng(0).normal(0, 60, (16, 16, 1)), 0, 255).astype(np.uint8)
    status, restored = call(server, "/v1/edit", {"image": b64(helpers.encode(Image.fromarray(noisy))),
                                                 "mode": "restore", "seed": 1, "steps": 10})
    assert status == 200, restored
    assert np.abs(pixels(restored["images"][0]) - pixels(image)).mean() < np.abs(noisy - pixels(image)).mean()
    status, refused = call(server, "/v1/edit", {"image": image, "mode": "restore", "strength": 0.5})
    assert status == 422 and refused["field"] == "strength", refused


def test_interpolate_ends_at_each_seeds_image(server):
    status, path = call(server, "/v1/interpolate", {"label": 3, "seed": 11, "to_seed": 40, "n": 4, "steps": 10,
                                                    "sampler": "ddim"})
    assert status == 200, path
    assert path["seeds"] == [11, 11, 11, 40] and len(path["images"]) == 4
    for seed, image in ((11, path["images"][0]), (40, path["images"][-1])):
        _, alone = call(server, "/v1/generate", {"label": 3, "seed": seed, "steps": 10, "sampler": "ddim"})
        assert np.abs(pixels(alone["images"][0]) - pixels(image)).max() <= 1
    _, labels = call(server, "/v1/interpolate", {"label": 3, "to_label": 8, "seed": 11, "n": 3, "steps": 10})
    assert len(labels["images"]) == 3


def test_malformed_requests_get_4xx_naming_the_field(server):
    png16 = b64(helpers.png(16, 16))
    cases = [
        ("/v1/generate", None, b"{not json", 422, "body"),
        ("/v1/generate", {"lable": 3}, None, 422, "lable"),
        ("/v1/generate", {"label": "three"}, None, 422, "label"),
        ("/v1/generate", {"label": 10}, None, 422, "label"),
        ("/v1/generate", {"prompt": "a seven"}, None, 422, "prompt"),
        ("/v1/generate", {"steps": 51}, None, 422, "steps"),
        ("/v1/generate", {"steps": 0}, None, 422, "steps"),
        ("/v1/generate", {"n": 9}, None, 422, "n"),
        ("/v1/generate", {"n": 0}, None, 422, "n"),
        ("/v1/generate", {"sampler": "euler"}, None, 422, "sampler"),
        ("/v1/generate", {"guidance": -1}, None, 422, "guidance"),
        ("/v1/generate", {"seed": -5}, None, 422, "seed"),
        ("/v1/edit", {"strength": 0.5}, None, 422, "image"),
        ("/v1/edit", {"image": "not base64!"}, None, 422, "image"),
        ("/v1/edit", {"image": b64(b"hello")}, None, 422, "image"),
        ("/v1/edit", {"image": b64(helpers.truncated_png())}, None, 422, "image"),
        ("/v1/edit", {"image": png16, "strength": 2}, None, 422, "strength"),
        ("/v1/edit", {"image": b64(helpers.png(150, 150))}, None, 413, "image"),  # over max_image_bytes
        ("/v1/edit", {"image": b64(helpers.bomb_png(2000))}, None, 413, "image"),  # over max_image_pixels
        ("/v1/inpaint", {"image": png16}, None, 422, "mask"),
        ("/v1/interpolate", {"label": 3}, None, 422, "to_seed"),
        ("/v1/interpolate", {"label": 3, "to_label": 12}, None, 422, "to_label"),
        ("/v1/interpolate", {"to_seed": -1}, None, 422, "to_seed"),
        ("/v1/edit", {"image": png16, "mode": "rewind"}, None, 422, "mode"),
        ("/v1/edit", {"image": png16, "source_label": 2}, None, 422, "source_label"),
        ("/v1/edit", {"image": png16, "mode": "invert", "sampler": "dpm++"}, None, 422, "sampler"),
        ("/v1/inpaint", {"image": png16, "mask": b64(helpers.png(8, 8))}, None, 422, "mask"),
    ]
    for path, body, raw, status, field in cases:
        got, answer = call(server, path, body, raw=raw)
        assert got == status, (path, body, got, answer)
        assert field in answer["error"], (path, body, answer)
    assert call(server, "/v1/generate", method="GET")[0] == 405
    status, health = call(server, "/healthz")
    assert status == 200 and health["status"] == "ok"  # the replica is still there


def test_every_route_but_healthz_needs_a_key(server):
    for authorization in (None, "Bearer not-the-key-0123456789", f"Basic {KEY}", KEY):
        for path, body in (("/v1/generate", {"label": 1, "steps": 2}), ("/v1/model", None), ("/openapi.json", None)):
            status, answer = call(server, path, body, authorization=authorization)
            assert status == 401 and answer == {
                "error": "authorization: a valid `Authorization: Bearer KEY` header is needed",
                "field": "authorization"}, (path, authorization, status, answer)
    assert call(server, "/healthz", authorization=None)[0] == 200  # a load balancer's check carries no key
    assert call(server, "/v1/generate", {"label": 1, "steps": 2})[0] == 200


def test_refusals_name_the_field_and_never_echo_the_request(server):
    png16 = b64(helpers.png(16, 16))
    for body in ({"image": png16, "strength": "high"}, {"image": png16, "mask": png16 + "!", "label": 3},
                 {"image": png16, "lable": 3}):
        path = "/v1/inpaint" if "mask" in body else "/v1/edit"
        status, answer = call(server, path, body)
        assert status == 422 and set(answer) == {"error", "field"}, answer
        assert png16[:40] not in json.dumps(answer)
    status, answer = call(server, "/v1/edit", {"image": png16, "strength": "high"})
    assert answer["field"] == "strength"


def test_images_may_come_as_data_urls(server):
    png16 = b64(helpers.png(16, 16))
    status, answer = call(server, "/v1/edit", {"image": f"data:image/png;base64,{png16}", "strength": 0.5,
                                               "label": 2, "steps": 4})
    assert status == 200, answer
    status, answer = call(server, "/v1/edit", {"image": f"data:image/png,{png16}", "label": 2})
    assert status == 422 and answer["field"] == "image" and "base64" in answer["error"]


def test_model_description_and_openapi(server):
    status, model = call(server, "/v1/model")
    assert status == 200
    assert (model["name"], model["alias"], model["conditioning"]) == (NAME, "production", "class")
    assert model["class_names"] == [str(i) for i in range(10)]
    assert model["lineage"]["image_dataset"] and model["lineage"]["autoencoder"]["uri"].startswith("models:/")
    assert model["tags"]["ldmflow.latent_manifest_sha256"] == model["lineage"]["latent_manifest_sha256"]
    _, openapi = call(server, "/openapi.json")
    assert {"/v1/generate", "/v1/edit", "/v1/inpaint", "/v1/model", "/healthz"} <= set(openapi["paths"])
    assert "EditRequest" in openapi["components"]["schemas"]
    # The error body it documents is the one sent, for every refusal.
    responses = openapi["paths"]["/v1/generate"]["post"]["responses"]
    for status in ("401", "409", "413", "422"):
        assert responses[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert set(openapi["components"]["schemas"]["ErrorBody"]["properties"]) == {"error", "field"}
    assert "HTTPValidationError" not in openapi["components"]["schemas"]


def test_another_version_draws_beside_the_followed_one_and_every_version_is_listed(server, digits_model):
    """A request may name a version by number or alias: the replica loads it beside the one
    it follows, and the same seeds draw the same images from the same weights. /v1/versions
    lists each version with its aliases, scores and lineage."""
    run = tracking.client().create_run(tracking.experiment_id("test-serving")).info.run_id
    other = models.register(digits_model.folder, NAME, run).version  # alias candidate
    tracking.client().set_model_version_tag(NAME, other, "ldmflow.eval.fd", "12.5")
    body = {"label": 4, "n": 2, "seed": 5, "steps": 6}
    status, followed = call(server, "/v1/generate", body)
    assert status == 200, followed
    for version in ("candidate", other):
        status, drawn = call(server, "/v1/generate", {**body, "version": version})
        assert status == 200, drawn
        assert drawn["model"] == {"name": NAME, "version": other, "uri": f"models:/{NAME}/{other}"}
        assert drawn["seeds"] == followed["seeds"]
        for mine, theirs in zip(drawn["images"], followed["images"]):
            assert np.abs(pixels(mine) - pixels(theirs)).max() <= 1
    status, listed = call(server, "/v1/versions")
    assert status == 200 and listed["name"] == NAME
    by_version = {v["version"]: v for v in listed["versions"]}
    assert [v["version"] for v in listed["versions"]] == sorted(by_version, key=int, reverse=True)
    assert "candidate" in by_version[other]["aliases"] and by_version[other]["metrics"]["fd"] == 12.5
    assert "production" in by_version[followed["model"]["version"]]["aliases"]
    assert by_version[other]["tags"]["ldmflow.run_id"] == digits_model.run_id
    for version, says in (("nonesuch", f"version: {NAME} has no version or alias 'nonesuch'"), ("../1", "version: ")):
        status, refused = call(server, "/v1/generate", {**body, "version": version})
        assert status == 422 and refused["field"] == "version" and refused["error"].startswith(says), refused
    _, openapi = call(server, "/openapi.json")
    assert "/v1/versions" in openapi["paths"] and "version" in openapi["components"]["schemas"]["GenerateRequest"]["properties"]


def test_promotion_reaches_the_server_without_a_failed_request(server, digits_model):
    run = tracking.client().create_run(tracking.experiment_id("test-serving")).info.run_id
    new_version = models.register(digits_model.folder, NAME, run).version
    outcomes, stop = [], threading.Event()

    def client_loop():
        seed = 0
        while not stop.is_set():
            seed += 1
            outcomes.append(call(server, "/v1/generate", {"label": seed % 10, "seed": seed, "steps": 4}, timeout=30))

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for thread in threads:
        thread.start()
    def answered(version: str) -> int:
        return sum(s == 200 and body["model"]["version"] == version for s, body in list(outcomes))

    try:
        helpers.wait_until(lambda: answered("1") >= 3, 60, "three answers of version 1")
        tracking.client().set_registered_model_alias(NAME, "production", new_version)
        helpers.wait_until(lambda: answered(new_version) >= 1, 60, f"the first answer of version {new_version}")
        served = len(outcomes)
        helpers.wait_until(lambda: len(outcomes) >= served + 3, 60, "three answers after the swap")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    failures = [(s, b) for s, b in outcomes if s != 200]
    assert not failures, failures[:3]
    versions = [body["model"]["version"] for _, body in outcomes]
    assert versions[0] == "1" and versions[-1] == new_version
    assert call(server, "/v1/model")[1]["version"] == new_version


def test_a_promotion_key_promotes_behind_the_gate_and_rejects_recording_who_and_why(server, digits_model):
    """POST /v1/promote applies the gate of ``ldmflow promote`` to the recorded evaluations:
    only a promotion key opens it; a better candidate takes production, a worse one is
    refused, a rejection moves nothing; each decision names the key's holder and the reason."""
    client = tracking.client()
    run = client.create_run(tracking.experiment_id("test-serving")).info.run_id
    worse = models.register(digits_model.folder, NAME, run).version
    better = models.register(digits_model.folder, NAME, run).version  # the newest: alias candidate
    production = call(server, "/v1/model")[1]["version"]
    as_ana = f"Bearer {PROMOTE_KEY}"

    status, refused = call(server, "/v1/promote", {"version": better})  # the API key may draw only
    assert (status, refused["field"]) == (403, "authorization"), refused
    assert call(server, "/v1/promote", {"version": better}, authorization=None)[0] == 401
    status, refused = call(server, "/v1/promote", {"version": better}, authorization=as_ana)
    assert status == 409 and f"version {better} has no recorded fd" in refused["error"], refused

    for version, fd in ((production, 20.0), (better, 10.0), (worse, 30.0)):
        client.set_model_version_tag(NAME, version, "ldmflow.eval.fd", repr(fd))
        client.set_model_version_tag(NAME, version, "ldmflow.eval.config", "one-config")
    status, decision = call(server, "/v1/promote", {"version": "candidate", "reason": "sharper sevens"},
                            authorization=as_ana)
    assert status == 200, decision
    assert (decision["promoted"], decision["candidate"], decision["production"], decision["by"]) == (
        True, better, production, "ana")
    assert (decision["candidate_score"], decision["production_score"]) == (10.0, 20.0)
    assert str(client.get_model_version_by_alias(NAME, "production").version) == better
    tags = client.get_model_version(NAME, better).tags
    assert (tags["ldmflow.promotion.decision"], tags["ldmflow.promotion.by"], tags["ldmflow.promotion.why"]) == (
        "promoted", "ana", "sharper sevens")

    status, decision = call(server, "/v1/promote", {"version": worse}, authorization=as_ana)
    assert status == 200 and not decision["promoted"] and decision["reason"].startswith("not better"), decision
    status, decision = call(server, "/v1/reject", {"version": worse, "reason": "blurry"}, authorization=as_ana)
    assert status == 200 and not decision["promoted"], decision
    assert client.get_model_version(NAME, worse).tags["ldmflow.promotion.decision"] == "rejected"
    assert str(client.get_model_version_by_alias(NAME, "production").version) == better

    assert call(server, "/v1/generate", {"label": 1, "steps": 2}, authorization=as_ana)[0] == 200  # it may draw
    _, openapi = call(server, "/openapi.json")
    assert {"/v1/promote", "/v1/reject", "/v1/versions"} <= set(openapi["paths"])
    helpers.wait_until(lambda: call(server, "/v1/model")[1]["version"] == better, 60, "the server on the promoted version")


def scrape() -> dict[tuple, float]:
    """ldmflow's samples on the metrics ports of the session's Ray nodes."""
    import ray

    return helpers.scrape([f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
                           for node in ray.nodes() if node["Alive"]])


def counts(samples: dict[tuple, float]) -> dict[tuple, float]:
    return {key: value for key, value in samples.items() if key[0] != "ray_ldmflow_model_version"}


def settled_scrape(quiet_for: float = 12.0, limit: float = 60.0) -> dict[tuple, float]:
    """A scrape once earlier requests have all been exported: their counts unchanged for
    longer than Ray's report interval (10 s)."""
    deadline, last, since = time.monotonic() + limit, scrape(), time.monotonic()
    while time.monotonic() - since < quiet_for and time.monotonic() < deadline:
        time.sleep(2.0)
        now = scrape()
        if counts(now) != counts(last):
            last, since = now, time.monotonic()
    return last


def test_requests_batches_images_and_the_model_version_are_prometheus_metrics(server):
    def requests(samples, route, status):
        return samples.get(("ray_ldmflow_requests_total", (("route", route), ("status", status))), 0.0)

    before = settled_scrape()
    with ThreadPoolExecutor(4) as pool:  # a batch of 4 requests of 2 images each
        answers = list(pool.map(lambda seed: call(server, "/v1/generate", {"label": 1, "n": 2, "seed": seed,
                                                                           "steps": 3}), range(4)))
    assert [status for status, _ in answers] == [200] * 4
    assert call(server, "/v1/generate", {"label": 1}, authorization=None)[0] == 401
    assert call(server, "/v1/generate", {"label": "one"})[0] == 422
    assert call(server, "/wp-login.php", method="GET")[0] == 404
    version = call(server, "/v1/model")[1]["version"]

    expected = {("/v1/generate", "200"): 4, ("/v1/generate", "401"): 1, ("/v1/generate", "422"): 1,
                ("other", "404"): 1, ("/v1/model", "200"): 1}
    deadline = time.monotonic() + 60  # Ray exports every few seconds
    while True:
        after = scrape()
        counted = {key: requests(after, *key) - requests(before, *key) for key in expected}
        images = (after.get(("ray_ldmflow_images_total", (("mode", "generate"),)), 0.0)
                  - before.get(("ray_ldmflow_images_total", (("mode", "generate"),)), 0.0))
        if counted == expected and images >= 8 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert counted == expected
    assert images == 8
    assert after[("ray_ldmflow_model_version", (("model", NAME),))] == float(version)
    batches = after[("ray_ldmflow_batch_size_count", ())] - before.get(("ray_ldmflow_batch_size_count", ()), 0.0)
    assert 1 <= batches <= 4  # the 4 concurrent requests, in as few batches as arrived together
    latency = after[("ray_ldmflow_request_seconds_count", (("route", "/v1/generate"),))]
    assert latency >= 6 and after[("ray_ldmflow_request_seconds_sum", (("route", "/v1/generate"),))] > 0


def test_keys_come_from_the_environment_or_a_file_and_are_compared_by_digest(tmp_path):
    from ldmflow.serving import auth

    keys_file = tmp_path / "keys"
    keys_file.write_text("# ops\nfile-key-0123456789abcdef\n\n")
    keys = auth.load_keys({auth.ENV: "env-key-0123456789abcdef, other-key-0123456789abcd"}, str(keys_file))
    assert keys == ["env-key-0123456789abcdef", "other-key-0123456789abcd", "file-key-0123456789abcdef"]
    digests = auth.digests(keys)
    assert not any(key in " ".join(digests) for key in keys)  # only digests reach the replicas
    assert auth.allowed("Bearer file-key-0123456789abcdef", digests)
    assert auth.allowed("bearer env-key-0123456789abcdef", digests)
    assert not auth.allowed("Bearer file-key-0123456789abcdeX", digests)
    assert not auth.allowed(None, digests) and not auth.allowed("", digests)
    with pytest.raises(auth.AuthError, match="shorter than 16"):
        auth.load_keys({auth.ENV: "short"})
    with pytest.raises(auth.AuthError, match="cannot read it"):
        auth.load_keys({}, str(tmp_path / "missing"))


def test_no_keys_means_loopback_only_unless_allowed(monkeypatch):
    from ldmflow.serving import auth

    monkeypatch.delenv(auth.ENV, raising=False)
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(auth.AuthError, match=f"serve.host {host} without API keys"):
            app.run("models:/anything@production", app.ServeConfig(host=host))  # refused before Ray or the model
    for host in ("127.0.0.1", "::1", "localhost"):
        auth.check_exposure(host, [], allow_unauthenticated=False)
    auth.check_exposure("0.0.0.0", [], allow_unauthenticated=True)
    auth.check_exposure("0.0.0.0", auth.digests(["k" * 20]), allow_unauthenticated=False)
    with pytest.raises(auth.AuthError, match="a served application without API keys"):
        app.build_app({"model_uri": "models:/anything@production"})


def test_an_inpainting_model_that_is_not_one_is_refused_in_one_line(digits_model):
    from ldmflow.model.model_format import ModelError

    with pytest.raises(ModelError, match=r"^serve.inpainting_model \S+: not trained for inpainting \(its UNet takes "
                                         r"the latent's 4 channels only\)"):
        app.run(digits_model.model_uri, app.ServeConfig(inpainting_model=digits_model.model_uri))


def test_http_pyfunc_and_the_command_line_refuse_alike(server, tmp_path, capsys):
    """The same bad requests through the HTTP API, the registered model's pyfunc and the
    ``ldmflow sample`` command's function: one parser (ldmflow.data.jobs), the same refusal,
    word for word, from each."""
    import mlflow
    import mlflow.pyfunc
    import pandas as pd
    import typer

    from ldmflow.flows.cli_models import sample

    png16, png8 = helpers.png(16, 16), helpers.png(8, 8)
    cases = [  # (route, HTTP body, uploads the command line reads from files)
        ("/v1/generate", {"label": 10}, {}),
        ("/v1/generate", {"prompt": "a seven"}, {}),
        ("/v1/edit", {"image": b64(b"hello"), "label": 3}, {"image": b"hello"}),
        ("/v1/edit", {"image": b64(png16), "source_label": 2}, {"image": png16}),
        ("/v1/edit", {"image": b64(png16), "mode": "invert", "sampler": "dpm++"}, {"image": png16}),
        ("/v1/inpaint", {"image": b64(png16), "mask": b64(png8)}, {"image": png16, "mask": png8}),
    ]
    mlflow.set_tracking_uri(tracking.tracking_uri())
    mlflow.set_registry_uri(tracking.tracking_uri())
    try:
        pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}@production")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    for route, body, files in cases:
        status, answer = call(server, route, {"steps": 2, **body})
        assert status == 422, (route, body, answer)
        with pytest.raises(ValueError) as refused:
            pyfunc.predict(pd.DataFrame([{"steps": 2, **body}]))
        assert str(refused.value) == answer["error"], (body, answer)

        options = {field: value for field, value in body.items() if field in ("label", "prompt", "source_label", "sampler")}
        for field, data in files.items():
            (tmp_path / field).write_bytes(data)
            options["init_image" if field == "image" else "mask"] = str(tmp_path / field)
        capsys.readouterr()
        with pytest.raises(typer.Exit) as exited:
            sample(f"models:/{NAME}@production", out=str(tmp_path / "out"), steps=2, invert=body.get("mode") == "invert",
                   progress=False, **options)
        # The driver's own stderr; a line Ray forwards from an actor ("(ProxyActor pid=…) …") may land in it.
        own = [line for line in capsys.readouterr().err.splitlines() if "pid=" not in line.split(")")[0]]
        assert exited.value.exit_code == 2 and own == [f"error: {answer['error']}"], options
