"""``stylegrad serve``'s APIs through an HTTP client: A1111's request and response shapes (as the webuiapi client
sends and reads them), stylegrad's own, every validation error, auth, the queue's limits and cancel, and the
same pixels as ``stylegrad generate``."""

import base64
import io
import json
import logging
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_addons_generate import write_kohya  # noqa: E402
from tiny import PROJ  # noqa: E402

from stylegrad import Style, save_style  # noqa: E402
from stylegrad.apps.cli import main  # noqa: E402
from stylegrad.apps.serve.app import create_app  # noqa: E402
from stylegrad.apps.serve.jobs import JobQueue, QueueFull  # noqa: E402
from stylegrad.apps.serve.service import Service  # noqa: E402
from stylegrad.apps.serve.settings import ServeSettings  # noqa: E402
from stylegrad.errors import StylegradError  # noqa: E402
from stylegrad.pipelines.generation import Generator  # noqa: E402

KEY = "s3cret-key-for-tests"
PROMPT = "a red triangle"
# what webuiapi's WebUIApi.txt2img() posts (its defaults), with a small size for the tiny model
WEBUIAPI_BODY = {
    "enable_hr": False, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2,
    "hr_upscaler": "Latent", "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "prompt": PROMPT,
    "styles": [], "seed": 7, "subseed": -1, "subseed_strength": 0.0, "seed_resize_from_h": 0,
    "seed_resize_from_w": 0, "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1, "steps": 2, "cfg_scale": 7.0,
    "width": 32, "height": 32, "restore_faces": False, "tiling": False, "do_not_save_samples": False,
    "do_not_save_grid": False, "negative_prompt": "", "eta": 1.0, "s_churn": 0, "s_tmax": 0, "s_tmin": 0,
    "s_noise": 1, "override_settings": {}, "override_settings_restore_afterwards": True, "script_args": [],
    "sampler_index": "Euler a", "script_name": None, "send_images": True, "save_images": False,
    "alwayson_scripts": {},
}


def png_b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    styles, loras, embeddings = root / "styles", root / "Lora", root / "embeddings"
    for d in (styles, loras, embeddings):
        d.mkdir()
    save_style(Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(3)), name="stripes"),
               styles / "stripes.safetensors")
    write_kohya(loras / "inked.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 32) * 0.05}, "name": "glossy"}, embeddings / "glossy.pt")
    torch.save({"<x>": torch.randn(1024)}, embeddings / "wide.pt")  # another width: listed as skipped
    (root / "secret.safetensors").write_bytes(b"not for clients")
    return root


@pytest.fixture(scope="module")
def generator(world, dirs):
    clip_dir, sd_dir = world
    return Generator.load(str(sd_dir), "cpu", str(clip_dir), embeddings_dirs=[str(dirs / "embeddings")],
                          loras_dirs=[str(dirs / "Lora")])


def make_client(generator, dirs, world, **settings):
    s = ServeSettings(styles_dirs=(str(dirs / "styles"),), loras_dirs=(str(dirs / "Lora"),),
                      embeddings_dirs=(str(dirs / "embeddings"),), ui=False, **settings)
    service = Service(generator, s, clip_model=str(world[0]))
    return TestClient(create_app(service)), service


@pytest.fixture(scope="module")
def client(generator, dirs, world):
    c, service = make_client(generator, dirs, world, max_waiting=4)
    with c:
        yield c


def test_txt2img_as_webuiapi_sends_it_and_reads_it_back(client):
    r = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"images", "parameters", "info"} and isinstance(body["info"], str)
    info = json.loads(body["info"])  # webuiapi: json.loads(r['info'])
    assert info["seed"] == 7 and info["all_seeds"] == [7] and info["sampler_name"] == "Euler a"
    image = decode(body["images"][0])  # webuiapi: Image.open(io.BytesIO(base64.b64decode(...)))
    assert image.size == (32, 32)
    assert image.info["parameters"] == info["infotexts"][0] and "Seed: 7" in info["infotexts"][0]
    assert body["parameters"]["prompt"] == PROMPT
    again = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY).json()
    assert np.array_equal(np.asarray(decode(again["images"][0])), np.asarray(image))  # seeded: the same pixels


def test_batches_have_consecutive_seeds_and_minus_one_is_random(client):
    r = client.post("/sdapi/v1/txt2img", json={**WEBUIAPI_BODY, "seed": -1, "batch_size": 2, "n_iter": 1})
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 2 and info["all_seeds"][1] == info["all_seeds"][0] + 1


def test_the_aesthetic_fields_under_the_extensions_title_apply_the_style(client):
    plain = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY).json()
    script = {"Aesthetic embeddings": {"args": [1.0, 5, 0.01, False, "stripes", "", 0.1, False]}}
    styled = client.post("/sdapi/v1/txt2img", json={**WEBUIAPI_BODY, "alwayson_scripts": script})
    assert styled.status_code == 200, styled.text
    text = json.loads(styled.json()["info"])["infotexts"][0]
    assert "Aesthetic steps: 5" in text and "Aesthetic LR: 0.01" in text
    a, b = (np.asarray(decode(x["images"][0]), dtype=float) for x in (plain, styled.json()))
    assert np.abs(a - b).mean() > 0.5  # the style changed the picture


def test_same_pixels_as_the_cli(client, world, tmp_path, capsys):
    _, sd_dir = world
    r = client.post("/v1/generate", json={"prompt": PROMPT, "seed": 3, "steps": 2, "width": 32, "height": 32,
                                          "sampler": "euler", "style": "stripes", "style_options": {"steps": 3}})
    assert r.status_code == 200, r.text
    served = decode(r.json()["images"][0])
    style = client.app.state.service.style_path("stripes")
    assert main(["generate", PROMPT, "--model", str(sd_dir), "--clip-model", str(world[0]), "--seed", "3",
                 "--steps", "2", "--width", "32", "--height", "32", "--sampler", "euler", "--style", style,
                 "--style-steps", "3", "--out", str(tmp_path)]) == 0
    (path,) = capsys.readouterr().out.split()
    with Image.open(path) as cli:
        assert np.array_equal(np.asarray(cli), np.asarray(served))
        assert cli.info["parameters"] == served.info["parameters"]


def test_a_lora_of_one_request_never_reaches_the_next(client):
    body = {"prompt": PROMPT, "seed": 5, "steps": 2, "width": 32, "height": 32}
    before = decode(client.post("/v1/generate", json=body).json()["images"][0])
    with_lora = client.post("/v1/generate", json={**body, "loras": ["inked:1.5"]})
    assert with_lora.status_code == 200, with_lora.text
    assert "Lora hashes" in with_lora.json()["infotexts"][0]
    tagged = client.post("/v1/generate", json={**body, "prompt": PROMPT + " <lora:inked:1>"}).json()
    after = decode(client.post("/v1/generate", json=body).json()["images"][0])
    assert np.array_equal(np.asarray(before), np.asarray(after))
    assert not np.array_equal(np.asarray(before), np.asarray(decode(tagged["images"][0])))


def test_png_info_round_trip(client):
    image = client.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY).json()["images"][0]
    r = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + image})
    assert r.status_code == 200, r.text
    assert r.json()["info"] == decode(image).info["parameters"]
    assert r.json()["parameters"]["Seed"] in (7, "7") and r.json()["parameters"]["Prompt"] == PROMPT


def test_lists(client):
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"]
    names = [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert "Euler a" in names and "DPM++ 2M Karras" in names
    assert [x["name"] for x in client.get("/sdapi/v1/loras").json()] == ["inked"]
    emb = client.get("/sdapi/v1/embeddings").json()
    assert emb["loaded"]["glossy"]["vectors"] == 2 and emb["loaded"]["glossy"]["shape"] == 32
    assert "wide" in emb["skipped"]
    p = client.get("/sdapi/v1/progress").json()
    assert {"progress", "eta_relative", "state", "current_image", "textinfo"} <= set(p)
    assert "stripes" in client.get("/v1/styles").json()["styles"]
    assert client.get("/openapi.json").json()["paths"]["/v1/generate"]


def test_a_style_from_uploaded_pictures(client, dirs):
    from stylegrad.world.demo import HERE

    pictures = sorted((HERE / "examples").glob("striped-*.png"))[:3]
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in pictures]
    r = client.post("/v1/styles", files=files, data={"name": "../uploaded style"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["images"] == 3 and body["saved"] and body["name"] == "uploaded_style"
    assert (dirs / "styles" / "uploaded_style.safetensors").is_file()  # inside the folder, whatever the name said
    r = client.post("/v1/generate", json={"prompt": PROMPT, "steps": 2, "width": 32, "height": 32,
                                          "style": "uploaded_style", "style_options": {"steps": 2}})
    assert r.status_code == 200, r.text
    text = io.BytesIO(b"just text, named like a picture")
    r = client.post("/v1/styles", files=[("files", ("photo.png", text, "image/png"))])
    assert r.status_code == 422 and "not a readable image" in r.json()["error"]


@pytest.mark.parametrize("path,body,expected", [
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 10000}, "at most"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 36}, "multiple of 8"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1000}, "at most"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope"}, "unknown sampler"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 5, "n_iter": 5}, "at most"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": 2**40}, "seed"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 99}}, "CLIP_stop"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "alwayson_scripts": {"Aesthetic embeddings": {"args": [
        1.0, 5, 0.01, False, "../secret"]}}}, "not in this server's style folders"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "alwayson_scripts": {"aesthetic embeddings": {"args": {"bad": 1}}}},
     "unknown argument"),
    ("/sdapi/v1/img2img", {"prompt": "x"}, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["%%%not-base64"]}, "base64"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [base64.b64encode(b"GIF89a-not-really").decode()]},
     "not a readable image"),
    ("/sdapi/v1/png-info", {"image": base64.b64encode(b"hello").decode()}, "not a readable image"),
    ("/v1/generate", {"prompt": "x", "loras": ["../secret"]}, "not in this server's LoRA folders"),
    ("/v1/generate", {"prompt": "x", "loras": ["/etc/passwd"]}, "LoRA"),
    ("/v1/generate", {"prompt": "x", "embeddings": ["../../secret"]}, "embedding"),
    ("/v1/generate", {"prompt": "x", "style": "../secret"}, "style"),
    ("/v1/generate", {"prompt": "x", "unknown_field": 1}, "unknown_field"),
    ("/v1/generate", {"prompt": "x", "style_options": {"towers": "x"}}, "towers"),
    ("/v1/generate", {"prompt": "x", "n": 99}, "at most"),
    ("/v1/generate", {}, "prompt"),
])
def test_every_bad_field_is_one_json_error(client, path, body, expected):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert expected in r.json()["error"] and "field" in r.json()  # one JSON shape, naming the field where known


def test_prompts_of_any_length_and_script(client):
    long = " ".join(["красный треугольник 赤い三角形 🔺"] * 60) + " (bright:1.3) BREAK on white"
    r = client.post("/sdapi/v1/txt2img", json={**WEBUIAPI_BODY, "prompt": long})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["info"])["prompt"] == long


def test_an_oversized_body_is_refused_before_it_is_read(client):
    r = client.post("/sdapi/v1/img2img", content=b"{}", headers={"content-length": str(200 << 20),
                                                                 "content-type": "application/json"})
    assert r.status_code == 413


def test_api_key(generator, dirs, world, caplog):
    with pytest.raises(StylegradError, match="needs --api-key"):
        ServeSettings(host="0.0.0.0")
    c, _ = make_client(generator, dirs, world, host="0.0.0.0", api_key=KEY)
    caplog.set_level(logging.INFO, logger="stylegrad.serve")
    with c:
        assert c.get("/sdapi/v1/samplers").status_code == 401
        wrong = c.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer nope-nope-nope"})
        assert wrong.status_code == 401 and KEY not in wrong.text
        assert c.get("/sdapi/v1/samplers", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        basic = base64.b64encode(f"me:{KEY}".encode()).decode()
        assert c.get("/v1/info", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        page = c.get("/")
        assert page.status_code == 401 and page.headers["www-authenticate"].startswith("Basic")
        r = c.post("/sdapi/v1/txt2img", json={**WEBUIAPI_BODY, "prompt": "private words"},
                   headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
    logged = caplog.text
    assert "/sdapi/v1/txt2img 200" in logged
    assert "private words" not in logged and KEY not in logged


def test_a_full_queue_answers_429_and_cancel_stops_a_job(generator, dirs, world):
    c, service = make_client(generator, dirs, world, max_waiting=1)
    gate = threading.Event()
    with c:
        blocker = service.queue.submit(lambda job: gate.wait(30), "test")  # running: holds the worker
        while service.queue.current is not blocker:
            threading.Event().wait(0.01)
        waiting = service.queue.submit(lambda job: None, "test")  # fills the one waiting place
        r = c.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY)
        assert r.status_code == 429 and r.headers["retry-after"] and "busy" in r.json()["error"]
        gate.set()
        blocker.future.result(10), waiting.future.result(10)

        def slow(job):
            for i in range(1000):
                job.step("test", i, 1000)
                threading.Event().wait(0.01)

        job = service.queue.submit(slow, "test", "mine")
        while job.done_steps == 0:
            threading.Event().wait(0.01)
        assert c.get("/v1/progress/mine").json()["stage"] == "test"
        assert c.post("/v1/cancel/mine").status_code == 200
        with pytest.raises(Exception, match="cancelled"):
            job.future.result(10)
        # a cancelled /v1 request gets one clear error (A1111's /interrupt answers with the image so far:
        # test_serve_robust.py)
        results = {}
        t = threading.Thread(target=lambda: results.setdefault("r", c.post(
            "/v1/generate", json={"prompt": PROMPT, "steps": 40, "width": 64, "height": 64, "task_id": "long"})))
        t.start()
        while service.queue.current is None or service.queue.current.done_steps == 0:
            threading.Event().wait(0.01)
        assert c.post("/v1/cancel/long").status_code == 200
        t.join(60)
        assert results["r"].status_code == 409 and "cancelled" in results["r"].json()["error"]
        ok = c.post("/sdapi/v1/txt2img", json=WEBUIAPI_BODY)  # the next request runs as usual
        assert ok.status_code == 200


def test_the_queue_alone():
    q = JobQueue(max_waiting=1)
    gate = threading.Event()
    try:
        first = q.submit(lambda job: gate.wait(5) and 1)
        while q.current is None:
            threading.Event().wait(0.01)
        second = q.submit(lambda job: 2)
        with pytest.raises(QueueFull):
            q.submit(lambda job: 3)
        gate.set()
        assert first.future.result(5) == 1 and second.future.result(5) == 2
    finally:
        q.close()


def test_serve_command_refuses_an_open_address_without_a_key_before_loading(capsys, monkeypatch):
    monkeypatch.delenv("STYLEGRAD_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--model", "/nonexistent/model"]) == 1
    err = capsys.readouterr().err
    assert "needs --api-key" in err and err.count("\n") == 1  # one line, and before the (missing) model is read
    assert main(["serve", "--api-key", "short", "--model", "/nonexistent/model"]) == 1
    assert "at least 8 characters" in capsys.readouterr().err


def test_batching_runs_waiting_requests_together(generator, dirs, world):
    """--batch: requests that share the pipeline call's settings run as one batch; each image is its request's
    alone up to float rounding, with the same infotext; a request that cannot join (a LoRA) runs alone."""
    c, service = make_client(generator, dirs, world, max_batch=4)
    gate = threading.Event()
    bodies = [{"prompt": p, "seed": i, "steps": 2, "width": 32, "height": 32, "sampler": "euler"}
              for i, p in enumerate(["a red triangle", "a blue circle", "a green square (bright:1.2)"])]
    bodies[1]["style"] = "stripes"
    bodies.append({**bodies[0], "loras": ["inked"]})
    with c:
        alone = [c.post("/v1/generate", json=b).json() for b in bodies]
        service.queue.submit(lambda job: gate.wait(30), "test")  # holds the worker while the requests queue
        while service.queue.current is None:
            threading.Event().wait(0.01)
        results = {}
        threads = [threading.Thread(target=lambda i=i, b=b: results.setdefault(i, c.post("/v1/generate", json=b)))
                   for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        while service.queue.waiting < len(bodies):
            threading.Event().wait(0.01)
        sizes_before = list(service.queue.batch_sizes)
        gate.set()
        for t in threads:
            t.join(60)
    # three together, the LoRA one alone; in either order, since the four client threads reach the queue in any
    assert sorted(service.queue.batch_sizes[len(sizes_before):]) == [1, 3]
    for i in range(len(bodies)):
        got, want = results[i].json(), alone[i]
        assert got["infotexts"] == want["infotexts"]
        a, b = (np.asarray(decode(x["images"][0]), dtype=int) for x in (got, want))
        assert np.abs(a - b).max() <= 2


def test_stylecodes_image_to_code_to_preview(world, tmp_path):
    """/v1/codes: an image's style as a code; a code as a preview; and a request with a style image."""
    from diffusers import UNet2DConditionModel
    from tiny import tiny_siglip, tiny_stylecodes

    from stylegrad.stylecodes.codec import decode as decode_code
    from stylegrad.stylecodes.model import save_stylecodes

    clip_dir, sd_dir = world
    ckpt = save_stylecodes(tiny_stylecodes(UNet2DConditionModel.from_pretrained(sd_dir / "unet")),
                           tmp_path / "sc.safetensors")
    siglip, processor = tiny_siglip()
    siglip.save_pretrained(tmp_path / "siglip")
    processor.save_pretrained(tmp_path / "siglip")
    generator = Generator.load(str(sd_dir), "cpu", str(clip_dir), siglip_model=str(tmp_path / "siglip"))
    service = Service(generator, ServeSettings(ui=False), clip_model=str(clip_dir), stylecodes_model=str(ckpt))
    picture = Image.new("RGB", (40, 40), (200, 30, 30))
    with TestClient(create_app(service)) as c:
        r = c.post("/v1/codes", json={"image": png_b64(picture)})
        assert r.status_code == 200, r.text
        code = r.json()["code"]
        assert len(code) == 21 and decode_code(code).version == 1
        small = {"steps": 2, "width": 32, "height": 32}
        preview = c.post("/v1/codes", json={"code": code, **small})
        assert preview.status_code == 200, preview.text
        assert f"Stylecode: {code}" in preview.json()["infotext"]
        plain = c.post("/v1/generate", json={"prompt": "a house by a lake", **small}).json()
        assert not np.array_equal(np.asarray(decode(plain["images"][0])),
                                  np.asarray(decode(preview.json()["preview"])))  # the code changed the picture
        from_image = c.post("/v1/generate", json={"prompt": "a house", "stylecode_image": png_b64(picture), **small})
        assert from_image.status_code == 200, from_image.text
        assert code in from_image.json()["infotexts"][0]  # the same code, made from the same picture
        assert c.post("/v1/codes", json={}).status_code == 422
        assert c.post("/v1/codes", json={"code": "not-a-code", **small}).status_code == 422


def test_style_score_and_evaluation_with_a_predictor(generator, dirs, world, tmp_path):
    """With --predictor: a new style's aesthetic score, and the Evaluate tab's experiment with its report."""
    from stylegrad.pipelines.request import GenerationRequest
    from stylegrad.world.demo import HERE

    predictor = tmp_path / "tiny_predictor.pth"
    torch.save({"linear.weight": torch.randn(1, PROJ, generator=torch.Generator().manual_seed(1)),
                "linear.bias": torch.tensor([5.0])}, predictor)
    c, service = make_client(generator, dirs, world, predictor=str(predictor))
    pictures = sorted((HERE / "examples").glob("striped-*.png"))[:2]
    with c:
        r = c.post("/v1/styles", files=[("files", (p.name, p.read_bytes(), "image/png")) for p in pictures],
                   data={"name": "scored"})
        assert r.status_code == 200, r.text
        assert isinstance(r.json()["aesthetic_score"], float)
        base = GenerationRequest(prompt="", steps=2, width=32, height=32, model=str(generator.model))
        job = service.submit_evaluation(["a red triangle"], "stripes", [0, 2], 1, base, tmp_path / "eval")
        summary = job.future.result(120)
        assert set(summary["stripes"]) == {"0", "2"} or set(summary["stripes"]) == {0, 2}
        assert (tmp_path / "eval" / "report.html").is_file()
        with pytest.raises(StylegradError, match="1-20 prompts"):
            service.submit_evaluation([], "stripes", [0], 1, base, tmp_path / "e2")


def test_serve_without_its_extra_says_how_to_get_it(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    assert main(["serve", "--model", "/nonexistent/model"]) == 1
    assert "pip install 'stylegrad[serve]'" in capsys.readouterr().err
