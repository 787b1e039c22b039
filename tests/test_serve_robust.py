"""``stylegrad serve`` under input and traffic nobody planned for (issue 37): text JSON can carry and no tokenizer
reads, img2img of less than one step, a task id in use, bodies without a length, images that say 8000x8000 in
8 KB, A1111's interrupt, the extension's "off" values, and errors that would show the server's paths. Each answer
is what an A1111 client expects or the one JSON error shape ``{"error", "field"}``, never a 500 for bad input, and
never a dropped connection. Where the connection matters, a real uvicorn on 127.0.0.1 serves the app."""

import asyncio
import base64
import http.client
import io
import json
import struct
import threading
import time
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import WEBUIAPI_BODY, decode, dirs, generator, make_client, png_b64  # noqa: E402, F401

from stylegrad.apps.serve import images as serve_images  # noqa: E402
from stylegrad.apps.serve.app import create_app  # noqa: E402
from stylegrad.apps.serve.service import Service  # noqa: E402
from stylegrad.apps.serve.settings import ServeSettings  # noqa: E402

SMALL = {"steps": 2, "width": 32, "height": 32}
SCRIPT = "Aesthetic embeddings"


def post_json(client, path: str, body: dict):
    """``body`` as JSON text, escapes kept (a lone surrogate is valid JSON, not valid UTF-8)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def one_shape(r) -> dict:
    """The one error shape, whatever went wrong."""
    assert r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert set(body) == {"error", "field"} and isinstance(body["error"], str) and "\n" not in body["error"], body
    return body


@pytest.fixture()
def client(generator, dirs, world):  # noqa: F811
    app = make_client(generator, dirs, world)[0].app
    with TestClient(app, raise_server_exceptions=False) as c:  # a server error is a response here, as on the wire
        yield c


@contextmanager
def live(app):
    """The app on a real uvicorn (keep-alive, chunked bodies, connection handling), on a free port."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def still_open(conn: http.client.HTTPConnection) -> None:
    """The keep-alive connection answers a second request on the same socket."""
    sock = conn.sock
    assert sock is not None, "the server closed the connection"
    conn.request("GET", "/healthz")
    r = conn.getresponse()
    assert r.status == 200 and json.loads(r.read())["ok"]
    assert conn.sock is sock


def bomb_png(side: int = 8000) -> bytes:
    """A 1-bit PNG of side x side pixels in a few KB (the issue's decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress((b"\x00" + bytes((side + 7) // 8)) * side, 9)  # filter byte + packed pixels per row
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


# -- 1. text a tokenizer cannot read -----------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,field", [
    ("/sdapi/v1/txt2img", {**WEBUIAPI_BODY, "prompt": "a \ud800 cat"}, "prompt"),
    ("/sdapi/v1/txt2img", {**WEBUIAPI_BODY, "negative_prompt": "blurry \udfff"}, "negative_prompt"),
    ("/v1/generate", {"prompt": "a \ud800 cat", **SMALL}, "prompt"),
    ("/v1/generate", {"prompt": "a cat", "negative": "\ud83d", **SMALL}, "negative"),
    ("/v1/generate", {"prompt": "a cat", "style": "stripes", "style_options": {"text": "x\ud800"}, **SMALL},
     "style_options.text"),
])
def test_a_lone_surrogate_is_a_422_naming_the_field(client, path, body, field):
    r = post_json(client, path, body)
    assert r.status_code == 422, r.text
    error = one_shape(r)
    assert error["field"] == field and "surrogate" in error["error"]


def test_any_text_the_client_sent_comes_back_as_json(client):
    """Fields A1111 clients send and the server only echoes (other settings, other scripts' arguments) may hold
    a lone surrogate: the answer is still JSON, escaped."""
    r = post_json(client, "/sdapi/v1/txt2img", {**WEBUIAPI_BODY, "override_settings": {"sd_vae": "\ud800"}})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["override_settings"]["sd_vae"] == "\ud800"


# -- 2. img2img of less than one step ----------------------------------------------------------------------------
@pytest.mark.parametrize("steps,strength", [(1, 0.75), (2, 0.3), (10, 0.05)])
def test_img2img_below_one_step_runs_one_as_a1111(client, steps, strength):
    start = png_b64(Image.new("RGB", (32, 32), (200, 40, 40)))
    r = client.post("/sdapi/v1/img2img", json={**WEBUIAPI_BODY, "steps": steps, "denoising_strength": strength,
                                               "init_images": [start]})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert decode(r.json()["images"][0]).size == (32, 32) and info["denoising_strength"] == strength
    job = list(client.app.state.service.queue.jobs.values())[-1]
    assert job.total_steps == 1  # int(steps x strength) is 0: one denoising step, as A1111 runs


# -- 3. a task id in use; no error drops the connection ----------------------------------------------------------
def test_a_task_id_in_use_is_409_and_the_connection_stays_open(generator, dirs, world):  # noqa: F811
    c, service = make_client(generator, dirs, world)
    gate = threading.Event()
    with live(c.app) as port:
        service.queue.submit(lambda job: gate.wait(120), "test", "busy")  # runs, holding the worker
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            for path, body, field in [("/v1/generate", {"prompt": "x", "task_id": "busy", **SMALL}, "task_id"),
                                      ("/sdapi/v1/txt2img", {**WEBUIAPI_BODY, "force_task_id": "busy"},
                                       "force_task_id")]:
                conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
                r = conn.getresponse()
                error = json.loads(r.read())
                assert r.status == 409 and error["field"] == field and "'busy'" in error["error"], error
                still_open(conn)
        finally:
            gate.set()
        conn.close()


def test_a_bug_is_one_json_500_without_paths_and_the_connection_stays_open(generator, dirs, world, monkeypatch):  # noqa: F811
    c, service = make_client(generator, dirs, world)

    def broken():
        raise RuntimeError(f"cannot hash {dirs}/Lora/inked.safetensors or /srv/private/model.ckpt")

    monkeypatch.setattr(service, "models", broken)  # what sd-models lists
    with live(c.app) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/sdapi/v1/sd-models")
        r = conn.getresponse()
        assert r.status == 500 and r.getheader("content-type") == "application/json"
        error = json.loads(r.read())
        assert set(error) == {"error", "field"} and "RuntimeError" in error["error"]
        assert "inked.safetensors" in error["error"] and "model.ckpt" in error["error"]
        assert str(dirs) not in error["error"] and "/srv" not in error["error"]
        still_open(conn)
        conn.close()


# -- 4. the body limit, whatever the transfer encoding ----------------------------------------------------------
UPLOAD_START = (b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
                b"Content-Type: image/png\r\n\r\n")


@pytest.mark.parametrize("path,content_type,start", [
    ("/sdapi/v1/img2img", "application/json", b'{"init_images": ["'),
    ("/v1/styles", "multipart/form-data; boundary=xyz", UPLOAD_START),
])
def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(generator, dirs, world, path, content_type,  # noqa: F811
                                                                   start):
    c, _ = make_client(generator, dirs, world, max_upload_bytes=1 << 20, max_style_images=2)
    sent = 0
    total, piece = 128 << 20, b"A" * (64 << 10)

    def body():  # no length: httpx sends it chunked; a well-formed start, then more than the limit
        nonlocal sent
        yield start
        while sent < total:
            sent += len(piece)
            yield piece

    with live(c.app) as port, httpx.Client(timeout=60) as http:
        r = http.post(f"http://127.0.0.1:{port}{path}", content=body(), headers={"content-type": content_type})
    assert r.status_code == 413, r.text
    assert one_shape(r)["error"].startswith("request body larger than")
    assert sent < total // 4  # the server stopped reading near its limit (3 MB; 2 MB for styles), not at the end


# -- 5. images decoded off the event loop, refused from their header ---------------------------------------------
def test_an_image_of_too_many_pixels_is_refused_from_its_header(client):
    bomb = bomb_png()
    assert len(bomb) < 16_000
    b64 = base64.b64encode(bomb).decode()
    r = client.post("/sdapi/v1/img2img", json={**WEBUIAPI_BODY, "init_images": [b64]})
    assert r.status_code == 422 and one_shape(r)["field"] == "init_images[0]"
    # the size as the header gives it: 8000x8000, or its pixel count where PIL's own limit (lowered while the web
    # page is mounted in this process) refused it first
    assert ("8000x8000" in r.json()["error"] or "64,000,000 pixels" in r.json()["error"]), r.json()
    r = client.post("/v1/generate", json={"prompt": "x", "init_image": b64, **SMALL})
    assert r.status_code == 422 and r.json()["field"] == "init_image"
    r = client.post("/v1/styles", files=[("files", (f"{i}.png", bomb, "image/png")) for i in range(8)])
    assert r.status_code == 422 and "pixels" in r.json()["error"]
    assert client.get("/healthz").status_code == 200


def test_uploads_are_decoded_off_the_event_loop(generator, dirs, world, monkeypatch):  # noqa: F811
    real, on_loop = serve_images.open_image, []

    def watched(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker thread
            on_loop.append(False)
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_images, "open_image", watched)
    c, _ = make_client(generator, dirs, world)
    picture = Image.new("RGB", (32, 32), (10, 200, 10))
    with c:
        assert c.post("/sdapi/v1/img2img", json={**WEBUIAPI_BODY, "init_images": [png_b64(picture)]}).status_code \
            == 200
        image = c.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY).json()["images"][0]
        assert c.post("/sdapi/v1/png-info", json={"image": image}).status_code == 200
        assert c.post("/v1/styles", files=[("files", ("a.png", base64.b64decode(image), "image/png"))],
                      data={"name": "offloop"}).status_code == 200
    assert len(on_loop) >= 3 and not any(on_loop)


# -- 6. A1111's interrupt and send_images ------------------------------------------------------------------------
def _stopped_at_first_step(c, service, body: dict, endpoint: str):
    """``body`` sent to txt2img while the worker is held; at the first image's first denoising step the request
    waits until ``endpoint`` (interrupt, skip) has been posted. (the answer, the job, the denoising steps seen)"""
    gate, reached, go = threading.Event(), threading.Event(), threading.Event()
    service.queue.submit(lambda job: gate.wait(120), "test")  # holds the worker while the request queues
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("r", c.post("/sdapi/v1/txt2img", json=body)))
    t.start()
    while not (queued := [j for j in list(service.queue.jobs.values())
                          if j.kind == "generate" and not j.future.done()]):
        time.sleep(0.01)  # the request's own job (not the one holding the worker, nor an earlier request's)
    job = queued[-1]
    real, steps = job.step, []

    def step(stage, done, total):
        if stage == "denoising":
            steps.append(done)
            if done == 1:
                reached.set()
                go.wait(120)
        return real(stage, done, total)

    job.step = step
    gate.set()
    assert reached.wait(120)
    assert c.post(endpoint).status_code == 200
    go.set()
    t.join(120)
    return results["r"], job, steps


def test_interrupt_answers_with_the_image_so_far(generator, dirs, world):  # noqa: F811
    c, service = make_client(generator, dirs, world)
    with c:
        r, job, _ = _stopped_at_first_step(c, service, {**WEBUIAPI_BODY, "steps": 20, "batch_size": 2},
                                           "/sdapi/v1/interrupt")
        assert r.status_code == 200, r.text  # webuiapi reads it as any answer
        info = json.loads(r.json()["info"])
        assert len(r.json()["images"]) == 1 and info["all_seeds"] == [7]  # the second image never started
        assert decode(r.json()["images"][0]).size == (32, 32)
        assert job.done_steps == 1 and job.total_steps == 40  # one step of the first image's 20, of 40 in all
        ok = c.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY)  # the next request runs as usual
        assert ok.status_code == 200 and len(ok.json()["images"]) == 1


def test_skip_cuts_the_current_image_short_and_goes_on_with_the_next(generator, dirs, world):  # noqa: F811
    """A1111's skip: the image being denoised ends at the next step (kept as it is); the request then makes its
    next image in full and answers with both. The skipped image is the interrupted one's, the next is whole."""
    c, service = make_client(generator, dirs, world)
    body = {**WEBUIAPI_BODY, "steps": 20, "batch_size": 2}
    with c:
        whole = c.post("/sdapi/v1/txt2img", json=body).json()["images"]
        r, _, steps = _stopped_at_first_step(c, service, body, "/sdapi/v1/skip")
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["all_seeds"] == [7, 8]  # both images, unlike an interrupt
        images = r.json()["images"]
        assert steps == [1] + list(range(21, 41))  # one step of the first image, all 20 of the second
        assert decode(images[1]).tobytes() == decode(whole[1]).tobytes()  # the second image as without a skip
        assert decode(images[0]).tobytes() != decode(whole[0]).tobytes()  # the first cut short


def test_save_images_writes_the_pngs_into_the_outputs_folder(generator, dirs, world, tmp_path):  # noqa: F811
    from stylegrad.files.pnginfo import png_text

    c, _ = make_client(generator, dirs, world, outputs_dir=str(tmp_path / "outputs"))
    with c:
        r = c.post("/sdapi/v1/txt2img", json={**WEBUIAPI_BODY, "save_images": True, "batch_size": 2})
        assert r.status_code == 200 and len(r.json()["images"]) == 2  # answered as well
        c.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY)  # save_images false (the default): nothing written
    saved = sorted((tmp_path / "outputs" / "txt2img-images").glob("*.png"))
    assert [p.name.split("-")[:2] for p in saved] == [["00000", "7"], ["00001", "8"]]
    assert png_text(saved[0])["parameters"] == json.loads(r.json()["info"])["infotexts"][0]  # with its infotext


def test_send_images_false_answers_an_empty_list(client):
    r = client.post("/sdapi/v1/txt2img", json={**WEBUIAPI_BODY, "send_images": False})
    assert r.status_code == 200 and r.json()["images"] == []
    assert json.loads(r.json()["info"])["all_seeds"] == [7]


# -- 7. what A1111 clients read when they connect ---------------------------------------------------------------
def test_the_a1111_endpoints_clients_read_when_they_connect(client):
    model = client.get("/sdapi/v1/sd-models").json()[0]
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == model["title"]  # Open WebUI's check, webuiapi.util_get_current_model
    assert options["CLIP_stop_at_last_layers"] == 1
    for path in ("sd-vae", "hypernetworks", "face-restorers", "prompt-styles", "upscalers", "latent-upscale-modes"):
        r = client.get(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and r.json() == [], path
    assert [x["name"] for x in client.get("/sdapi/v1/schedulers").json()] == ["automatic", "karras"]
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [SCRIPT.lower()], "img2img": [SCRIPT.lower()]}
    info = client.get("/sdapi/v1/script-info").json()
    assert [x["is_img2img"] for x in info] == [False, True] and all(x["is_alwayson"] for x in info)
    args = info[0]["args"]
    assert [a["label"] for a in args[:3]] == ["Aesthetic weight", "Aesthetic steps", "Aesthetic learning rate"]
    assert len(args) == 8 and args[4]["choices"][0] == "None" and "stripes" in args[4]["choices"]
    assert set(client.get("/sdapi/v1/memory").json()) == {"ram", "cuda"}
    assert client.get("/sdapi/v1/cmd-flags").json()["api"] is True
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae"):
        r = client.post(f"/sdapi/v1/{path}")
        assert r.status_code == 200 and r.json() is None
    r = client.post("/sdapi/v1/interrogate", json={"image": "", "model": "clip"})
    assert r.status_code == 422 and one_shape(r)["field"] == "model"


def test_options_set_what_this_server_can_and_refuse_the_rest(client):
    """CLIP_stop_at_last_layers set through options applies to every A1111 request after (a request's
    override_settings still win); the loaded model may be 'set' to itself; nothing else changes silently."""
    title = client.get("/sdapi/v1/options").json()["sd_model_checkpoint"]
    plain = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY).json()
    override = {**WEBUIAPI_BODY, "override_settings": {"CLIP_stop_at_last_layers": 2}}
    skipped = client.post("/sdapi/v1/txt2img", json=override).json()
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title, "CLIP_stop_at_last_layers": 2,
                                                  "samples_format": "png"}).json() is None
    try:
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
        after = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY).json()
        assert after["images"] == skipped["images"] != plain["images"]
        unset = {**WEBUIAPI_BODY, "override_settings": {"CLIP_stop_at_last_layers": 1}}
        assert client.post("/sdapi/v1/txt2img", json=unset).json()["images"] == plain["images"]
        for body, field in [({"sd_model_checkpoint": "another.safetensors"}, "sd_model_checkpoint"),
                            ({"CLIP_stop_at_last_layers": 0}, "CLIP_stop_at_last_layers"),
                            ({"sd_vae": "other.vae.pt"}, "sd_vae"), ({"CLIP_stop_at_last_layers": 1, "x": 1}, "x")]:
            r = client.post("/sdapi/v1/options", json=body)
            assert r.status_code == 422 and one_shape(r)["field"] == field, r.text
        assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2  # nothing of a refusal
    finally:
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})


# -- 8. inpainting: one clear refusal until it is supported ------------------------------------------------------
def test_an_img2img_mask_is_refused_not_ignored(client):
    start = png_b64(Image.new("RGB", (32, 32)))
    r = client.post("/sdapi/v1/img2img", json={**WEBUIAPI_BODY, "init_images": [start], "mask": start})
    assert r.status_code == 422 and one_shape(r)["field"] == "mask" and "inpainting" in r.json()["error"]
    assert client.post("/sdapi/v1/img2img", json={**WEBUIAPI_BODY, "init_images": [start], "mask": None}) \
        .status_code == 200


# -- 9. the extension's "off" ------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight,steps,lr", [(0.9, 5, "0"), (0.9, 0, 0.01), (0, 5, 0.01)])
def test_a_zero_aesthetic_value_turns_the_style_off(client, weight, steps, lr):
    """The extension tunes only when steps, learning rate and weight are all non-zero (its lr arrives as text)."""
    plain = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY).json()
    script = {SCRIPT: {"args": [weight, steps, lr, False, "stripes", "", 0.1, False]}}
    r = client.post("/sdapi/v1/txt2img", json={**WEBUIAPI_BODY, "alwayson_scripts": script})
    assert r.status_code == 200, r.text
    assert "Aesthetic" not in json.loads(r.json()["info"])["infotexts"][0]
    assert np.array_equal(np.asarray(decode(r.json()["images"][0])), np.asarray(decode(plain["images"][0])))


# -- 10. png-info as A1111 answers it ----------------------------------------------------------------------------
def png_with(size: tuple[int, int], **chunks: str) -> str:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def test_png_info_answers_as_a1111(client):
    image = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY).json()["images"][0]
    params = client.post("/sdapi/v1/png-info", json={"image": image}).json()["parameters"]
    assert params["Size-1"] == params["Size-2"] == "32" and "Size" not in params
    assert params["Clip skip"] == "1" and params["Prompt"] == WEBUIAPI_BODY["prompt"] and params["Seed"] == "7"

    comment = {"uc": "blurry", "steps": 28, "sampler": "k_euler_ancestral", "scale": 11, "seed": 42, "strength": 0.7}
    novelai = png_with((16, 24), Software="NovelAI", Description="a cat", Comment=json.dumps(comment))
    r = client.post("/sdapi/v1/png-info", json={"image": novelai}).json()
    assert r["info"] == ("a cat\nNegative prompt: blurry\nSteps: 28, Sampler: Euler a, CFG scale: 11, Seed: 42, "
                         "Size: 16x24, Clip skip: 2, ENSD: 31337")
    assert r["parameters"]["Size-1"] == "16" and r["parameters"]["Clip skip"] == "2"
    assert r["items"]["Software"] == "NovelAI"

    graph = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 7}}})
    r = client.post("/sdapi/v1/png-info", json={"image": png_with((16, 16), prompt=graph)}).json()
    assert r["info"] == "" and r["parameters"] == {} and r["items"]["prompt"] == graph


# -- 12. no server paths; a prompt's LoRA tags as the loras field ------------------------------------------------
def test_a_prompts_lora_tag_outside_the_folders_is_refused_as_the_loras_field_is(client):
    name = "../../etc/passwd"
    field = client.post("/v1/generate", json={"prompt": "x", "loras": [name], **SMALL})
    assert field.status_code == 422
    problem = one_shape(field)["error"].split(": ", 1)[1]
    for path, body in [("/sdapi/v1/txt2img", {**WEBUIAPI_BODY, "prompt": f"a cat <lora:{name}:1>"}),
                       ("/v1/generate", {"prompt": f"a cat <lora:{name}:1>", **SMALL}),
                       ("/v1/generate", {"prompt": "a cat <lora:missing:0.5>", **SMALL})]:
        r = client.post(path, json=body)
        assert r.status_code == 422 and one_shape(r)["field"] == "prompt", r.text
        assert r.json()["error"] == "prompt: " + problem.replace(name, body["prompt"].split(":")[1])
    assert client.post("/v1/generate", json={"prompt": "x <lora:inked:1>", **SMALL}).status_code == 200


def test_errors_never_show_the_servers_paths(client, dirs):  # noqa: F811
    broken = dirs / "Lora" / "broken.safetensors"
    broken.write_bytes(b"\x00" * 64)  # a file the operator put there, unreadable
    try:
        r = client.post("/v1/generate", json={"prompt": "x", "loras": ["broken"], **SMALL})
    finally:
        broken.unlink()
    assert 400 <= r.status_code < 500, r.text
    error = one_shape(r)["error"]
    assert str(dirs) not in error and "/tmp" not in error and "broken" in error


def test_the_path_hider():
    from stylegrad.apps.serve.errors import PathHider

    hide = PathHider(["/srv/models/Lora"])
    assert hide("bad file /srv/models/Lora/sub/x.safetensors") == "bad file sub/x.safetensors"
    assert hide("No such file: '/home/me/secret/a.pt' (see https://example.com/a/b)") == \
        "No such file: 'a.pt' (see https://example.com/a/b)"
    assert hide(r"cannot read C:\Users\me\model.ckpt") == "cannot read model.ckpt"
    assert hide("steps 1/2, sizes 8..2048, and/or text") == "steps 1/2, sizes 8..2048, and/or text"


# -- every other answer: the one shape ---------------------------------------------------------------------------
def test_framework_errors_have_the_one_shape(generator, dirs, world, monkeypatch):  # noqa: F811
    """With the web UI mounted at / too: an API path or method that does not exist is the API's 404 or 405."""
    s = ServeSettings(styles_dirs=(str(dirs / "styles"),), ui=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # the web UI lowers it: restored after
    with TestClient(create_app(Service(generator, s, clip_model=str(world[0])))) as client:
        assert Image.MAX_IMAGE_PIXELS == s.max_image_pixels  # what Gradio decodes itself is bounded too
        for r in (client.get("/sdapi/v1/nothing-here"), client.post("/v1/nothing/here")):
            assert r.status_code == 404 and one_shape(r)["field"] is None
        for method, path, allowed in [("get", "/sdapi/v1/txt2img", "POST"), ("put", "/v1/generate", "POST"),
                                      ("post", "/v1/progress/x", "GET")]:
            r = getattr(client, method)(path)
            assert r.status_code == 405 and r.headers["allow"] == allowed and one_shape(r)
        one_shape(client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"}))
        one_shape(client.post("/v1/generate", json={"prompt": 3}))
        for r in (client.get("/v1/progress/nothing"), client.post("/v1/cancel/nothing")):  # alike
            assert r.status_code == 404 and one_shape(r)["field"] == "task_id"
        assert client.get("/").status_code == 200  # the web UI still answers for itself


def test_the_openapi_document_declares_the_error_shape_the_server_sends(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert set(schemas["ErrorBody"]["properties"]) == {"error", "field"}
    assert "HTTPValidationError" not in schemas  # FastAPI's own shape: never sent here
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status in ("422", "500"):
                assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
                    "/ErrorBody"), (method, path, status)


def test_the_openapi_document_states_this_servers_limits(generator, dirs, world):  # noqa: F811
    c, _ = make_client(generator, dirs, world, max_side=512, max_steps=40, max_images=3, max_style_steps=9)
    with c:
        schemas = c.get("/openapi.json").json()["components"]["schemas"]
    gen, a1111 = schemas["Generate"]["properties"], schemas["Txt2Img"]["properties"]
    assert gen["steps"]["maximum"] == a1111["steps"]["maximum"] == 40 and gen["n"]["maximum"] == 3
    width = next(b for b in gen["width"]["anyOf"] if b["type"] == "integer")  # optional: the model's own
    assert width["maximum"] == a1111["width"]["maximum"] == 512 and width["multipleOf"] == 8
    assert schemas["StyleFields"]["properties"]["steps"]["maximum"] == 9
    assert gen["prompt"]["maxLength"] == a1111["negative_prompt"]["maxLength"] == 20_000
