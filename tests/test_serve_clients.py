"""``stylegrad serve`` driven by clients nobody here wrote (issue 37): ``webuiapi``, the Python client A1111 users
script with, and ``schemathesis``, which generates requests from ``/openapi.json`` and checks the answers against
it. Both talk HTTP to a real uvicorn on 127.0.0.1 serving the tiny model; nothing leaves the machine."""

import hashlib
import re
import threading

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
from test_serve import dirs, generator, make_client  # noqa: E402, F401
from test_serve_robust import live  # noqa: E402

SMALL = dict(steps=2, width=32, height=32, seed=7, sampler_name="Euler a")
SCRIPT = "Aesthetic embeddings"  # the extension's title, as clients key alwayson_scripts


@pytest.fixture(scope="module")
def server(generator, dirs, world):  # noqa: F811
    # small limits: schemathesis draws sizes and steps up to them, and each draw runs on the CPU
    c, service = make_client(generator, dirs, world, max_side=64, max_steps=10, max_images=2, max_style_images=2)
    with live(c.app) as port:
        yield port, service


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server[0], steps=2)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=float)


def test_txt2img_and_png_info(api):
    result = api.txt2img(prompt="a red house", negative_prompt="blurry", **SMALL)
    assert len(result.images) == 1 and result.image.size == (32, 32)
    assert result.info["all_seeds"] == [7] and result.info["sampler_name"] == "Euler a"  # webuiapi parsed info
    assert result.parameters["prompt"] == "a red house"
    again = api.txt2img(prompt="a red house", negative_prompt="blurry", **SMALL)
    assert np.array_equal(pixels(result.image), pixels(again.image))  # the same seed, the same picture

    info = api.png_info(result.image)  # webuiapi re-encodes the image with its text chunks
    fields = info.json["parameters"]
    assert info.info == result.info["infotexts"][0]
    assert fields["Prompt"] == "a red house" and fields["Negative prompt"] == "blurry"
    assert fields["Seed"] == "7" and (fields["Size-1"], fields["Size-2"]) == ("32", "32")


def test_img2img(api):
    red, blue = Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (40, 40, 200))
    result = api.img2img(images=[red], prompt="a red house", denoising_strength=0.5, **SMALL)
    assert result.image.size == (32, 32) and result.info["denoising_strength"] == 0.5
    assert np.array_equal(pixels(result.image), pixels(api.img2img(images=[red], prompt="a red house",
                                                                   denoising_strength=0.5, **SMALL).image))
    other = api.img2img(images=[blue], prompt="a red house", denoising_strength=0.5, **SMALL)
    assert not np.array_equal(pixels(result.image), pixels(other.image))  # the start image was used


def test_the_aesthetic_extensions_alwayson_scripts(api):
    plain = api.txt2img(prompt="a red house", **SMALL)
    for args in ([1.0, 5, 0.01, False, "stripes", "", 0.1, False],  # the extension's ui() order
                 {"aesthetic_weight": 1.0, "aesthetic_steps": 5, "aesthetic_lr": 0.01, "aesthetic_imgs": "stripes"}):
        styled = api.txt2img(prompt="a red house", alwayson_scripts={SCRIPT: {"args": args}}, **SMALL)
        text = styled.info["infotexts"][0]
        assert "Aesthetic steps: 5" in text and "Aesthetic LR: 0.01" in text
        assert np.abs(pixels(plain.image) - pixels(styled.image)).mean() > 0.5  # the style changed the picture
    off = api.txt2img(prompt="a red house", alwayson_scripts={SCRIPT: {"args": [1.0, 5, "0", False, "stripes"]}},
                      **SMALL)  # learning rate "0": the extension's off
    assert np.array_equal(pixels(plain.image), pixels(off.image))


def test_options_and_the_current_model(api, generator, tmp_path, monkeypatch):  # noqa: F811
    options = api.get_options()
    models = api.get_sd_models()
    assert [m["title"] for m in models] == [options["sd_model_checkpoint"]]
    assert api.util_get_current_model() == models[0]["title"] == api.util_get_model_names()[0]
    with monkeypatch.context() as m:  # a checkpoint file: its hashes, as A1111 gives them
        checkpoint = tmp_path / "house.safetensors"
        checkpoint.write_bytes(b"weights")
        m.setattr(generator, "model", str(checkpoint))
        m.setenv("STYLEGRAD_CACHE", str(tmp_path / "cache"))  # the hash cache: not the user's
        options, (model,) = api.get_options(), api.get_sd_models()
        assert options["sd_checkpoint_hash"] == model["sha256"] == hashlib.sha256(b"weights").hexdigest()
        assert model["title"] == f"house [{model['sha256'][:10]}]" == api.util_get_current_model()
    base = api.txt2img(prompt="a red house", **SMALL)
    try:
        api.set_options({"CLIP_stop_at_last_layers": 2})
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        skipped = api.txt2img(prompt="a red house", **SMALL)
        assert skipped.info["clip_skip"] == 2 and "Clip skip: 2" in skipped.info["infotexts"][0]
        assert not np.array_equal(pixels(base.image), pixels(skipped.image))
        assert api.set_options({"sd_model_checkpoint": models[0]["title"]}) is None  # the loaded model: accepted
        refused = api.set_options({"sd_model_checkpoint": "other [0123456789]"})  # no models folder: a 422
        assert refused["field"] == "sd_model_checkpoint" and "--models-dir" in refused["error"]
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1


def test_the_lists(api):
    samplers = api.get_samplers()
    assert "Euler a" in [s["name"] for s in samplers] and "Euler a" in api.util_get_sampler_names()
    assert [lora["name"] for lora in api.get_loras()] == ["inked"]
    embeddings = api.get_embeddings()
    assert "glossy" in embeddings["loaded"] and "wide" in embeddings["skipped"]
    assert embeddings["loaded"]["glossy"]["vectors"] == 2
    assert set(api.get_scripts()["txt2img"]) == {SCRIPT.lower()}
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())
    assert api.get_cmd_flags()["api"] is True and set(api.get_memory()) == {"ram", "cuda"}
    assert api.refresh_checkpoints() is None and api.skip() == {}  # nothing running: nothing to skip
    for empty in (api.get_sd_vae, api.get_upscalers, api.get_hypernetworks, api.get_face_restorers,
                  api.get_prompt_styles):
        assert empty() == []


def test_progress_and_interrupt(api, server):
    """A run held at its first step: progress shows it, interrupt ends it, and its request answers with the
    image so far as A1111 does (webuiapi raises on anything but 200)."""
    _, service = server
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job"] == ""
    reached, go, results = threading.Event(), threading.Event(), {}
    real_submit = service.queue.submit

    def submit(run, *args, **kwargs):  # the next job waits at its first denoising step
        job = real_submit(run, *args, **kwargs)
        real_step = job.step

        def step(stage, done, total):
            if stage == "denoising" and done == 1:
                real_step(stage, done, total)  # the progress first, as the run reports it
                reached.set()
                go.wait(30)
            return real_step(stage, done, total)

        job.step = step
        return job

    service.queue.submit = submit
    t = threading.Thread(target=lambda: results.setdefault(
        "r", api.txt2img(prompt="a red house", batch_size=2, **{**SMALL, "steps": 10})))
    t.start()
    try:
        assert reached.wait(60)
        service.queue.submit = real_submit
        busy = api.get_progress()
        assert busy["state"]["job"] and (busy["state"]["sampling_step"], busy["state"]["sampling_steps"]) == (1, 20)
        assert 0 < busy["progress"] < 1 and busy["state"]["job_count"] == 1
        assert api.interrupt() == {}
        assert api.get_progress()["state"]["interrupted"]
    finally:
        service.queue.submit = real_submit
        go.set()
        t.join(60)
    result = results["r"]
    assert len(result.images) == 1 and result.image.size == (32, 32) and result.info["all_seeds"] == [7]
    assert api.get_progress()["state"]["job"] == ""
    assert api.txt2img(prompt="a red house", **SMALL).image.size == (32, 32)  # the next request runs as usual


# -- the document a client is generated from (openapi-python-client was run on it by hand; see issue 37) ------
# what a generated client names its functions by: the route's name, not FastAPI's name_path_method
OPERATION_IDS = {("POST", "/sdapi/v1/txt2img"): "txt2img", ("POST", "/sdapi/v1/img2img"): "img2img",
                 ("GET", "/sdapi/v1/progress"): "progress", ("GET", "/sdapi/v1/options"): "options",
                 ("POST", "/sdapi/v1/options"): "set_options", ("GET", "/sdapi/v1/sd-models"): "sd_models",
                 ("GET", "/sdapi/v1/sd-vae"): "sd_vae", ("POST", "/sdapi/v1/refresh-loras"): "refresh_loras",
                 ("POST", "/v1/generate"): "generate", ("GET", "/v1/progress/{task_id}"): "task_progress",
                 ("POST", "/v1/cancel/{task_id}"): "cancel_task", ("POST", "/v1/styles"): "make_style"}


@pytest.fixture(scope="module")
def document(server):
    import httpx

    return httpx.get(f"http://127.0.0.1:{server[0]}/openapi.json").json()


def operations(document: dict) -> list[tuple[str, str, dict]]:
    return [(method.upper(), path, op) for path, ops in document["paths"].items() for method, op in ops.items()]


def test_operation_ids_are_unique_short_and_stable(document):
    """Generators name functions and modules by operationId: each unique, a plain name (no '_lambda_', no path
    or method in it), the same from one version to the next."""
    ids = [op["operationId"] for _, _, op in operations(document)]
    assert len(ids) == len(set(ids)) >= 30, ids
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", i) and "lambda" not in i and "sdapi" not in i for i in ids), ids
    by_route = {(method, path): op["operationId"] for method, path, op in operations(document)}
    assert {route: by_route.get(route) for route in OPERATION_IDS} == OPERATION_IDS


def test_every_answer_and_every_error_is_declared_in_the_shape_sent(document):
    """Each operation: a 200 with a schema, and each error status with the one error shape the server sends (a
    generated client parses a 422 into it), never FastAPI's own validation shape."""
    schemas = document["components"]["schemas"]
    assert schemas["ErrorBody"]["required"] == ["error"] and set(schemas["ErrorBody"]["properties"]) == {"error",
                                                                                                         "field"}
    assert "HTTPValidationError" not in schemas
    for method, path, op in operations(document):
        answers = op["responses"]
        assert "schema" in answers["200"]["content"]["application/json"], (method, path)
        for status in ("401", "404", "405", "409", "413", "422", "429", "500", "503"):
            assert answers[status]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
        assert "Retry-After" in answers["429"]["headers"] and "Allow" in answers["405"]["headers"]


def test_every_limit_is_in_the_document(document, server):
    """This server's flags, in the document: the field bounds, all limits under info.x-limits (as /v1/info
    gives them), each path's body limit in its 413, the images of one style upload; and uploads as binary files
    (without 'format: binary' a generated client sends a file as text and gets a 422)."""
    import httpx

    from stylegrad.apps.serve.app import body_limit

    port, service = server
    s, schemas = service.settings, document["components"]["schemas"]
    assert document["info"]["x-limits"] == httpx.get(f"http://127.0.0.1:{port}/v1/info").json()["limits"]
    assert document["info"]["x-limits"]["max_side"] == 64 and document["info"]["x-limits"]["max_style_images"] == 2
    for model, field, bounds in [("Txt2Img", "steps", {"minimum": 1, "maximum": 10}), ("Generate", "n", {"maximum": 2}),
                                 ("Generate", "width", {"minimum": 8, "maximum": 64, "multipleOf": 8})]:
        prop = schemas[model]["properties"][field]
        (branch,) = [b for b in prop.get("anyOf", [prop]) if b.get("type") == "integer"]  # optional: anyOf null
        assert {k: branch.get(k) for k in bounds} == bounds, (model, field, prop)
    for path in ("/v1/styles", "/sdapi/v1/img2img"):
        assert f" {body_limit(s, path)} bytes" in document["paths"][path]["post"]["responses"]["413"]["description"]
    files = schemas["Body_make_style"]["properties"]["files"]
    assert (files["minItems"], files["maxItems"]) == (1, 2) and files["items"]["format"] == "binary"


# -- schemathesis over /openapi.json ---------------------------------------------------------------------------
MAIN = [("POST", "/sdapi/v1/txt2img"), ("POST", "/sdapi/v1/img2img"), ("GET", "/sdapi/v1/progress"),
        ("GET", "/sdapi/v1/options"), ("GET", "/sdapi/v1/sd-models"), ("GET", "/sdapi/v1/samplers"),
        ("POST", "/sdapi/v1/png-info"), ("POST", "/v1/generate"), ("GET", "/v1/progress/{task_id}"),
        ("POST", "/v1/cancel/{task_id}"), ("GET", "/v1/styles"), ("GET", "/sdapi/v1/loras"),
        ("GET", "/sdapi/v1/embeddings"), ("GET", "/v1/info"), ("GET", "/sdapi/v1/cmd-flags"),
        ("GET", "/sdapi/v1/schedulers"), ("GET", "/sdapi/v1/scripts"), ("GET", "/sdapi/v1/script-info")]


@pytest.fixture(scope="module")
def openapi(server):
    schemathesis = pytest.importorskip("schemathesis")
    return schemathesis, schemathesis.openapi.from_url(f"http://127.0.0.1:{server[0]}/openapi.json")


def checked(schemathesis, case):
    """``case`` sent to the server; its answer checked: no 5xx, and the status and body as the document says."""
    response = case.call(timeout=120)  # schemathesis's 10 s default: a run at the limits on a loaded CPU exceeds it
    case.validate_response(response, checks=[schemathesis.checks.not_a_server_error,
                                             schemathesis.checks.status_code_conformance,
                                             schemathesis.checks.response_schema_conformance])
    return response


def test_the_main_answers_are_declared_and_conform(openapi, api):
    """What a generated client reads: each main endpoint's 200 answer has a schema, and real answers match it."""
    schemathesis, schema = openapi
    spec = schema.raw_schema
    for method, path in MAIN:
        ok = spec["paths"][path][method.lower()]["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok.get("$ref") or ok.get("items"), (method, path, ok)
    start = api.txt2img(prompt="a red house", **SMALL).json["images"][0]
    small = {"prompt": "a red house", "steps": 2, "width": 32, "height": 32, "seed": 7}
    bodies = {"/sdapi/v1/txt2img": small, "/sdapi/v1/img2img": {**small, "init_images": [start]},
              "/sdapi/v1/png-info": {"image": start}, "/v1/generate": small}
    task = None
    for method, path in MAIN:
        operation = schema[path][method]
        if "{task_id}" in path:
            case = operation.Case(path_parameters={"task_id": task})
        else:
            case = operation.Case(body=bodies[path]) if path in bodies else operation.Case()
        r = checked(schemathesis, case)
        assert r.status_code == 200, (path, r.text)
        if path == "/v1/generate":
            task = r.json()["task_id"]
    for path in ("/sdapi/v1/options", "/sdapi/v1/refresh-checkpoints"):  # A1111 answers a setting with null
        assert spec["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == {
            "type": "null"}
        r = checked(schemathesis, schema[path]["POST"].Case(**({"body": {"CLIP_stop_at_last_layers": 1}}
                                                                 if path.endswith("options") else {})))
        assert r.status_code == 200 and r.json() is None, (path, r.text)


def statuses_of(schemathesis, operation, examples: int) -> set[int]:
    """The statuses of ``examples`` requests drawn for ``operation``, each answer ``checked``."""
    from hypothesis import HealthCheck, Phase, given, settings

    seen = set()

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy())
    def check(case):
        seen.add(checked(schemathesis, case).status_code)

    check()
    return seen


def test_schemathesis_finds_no_server_error_and_no_answer_off_its_schema(openapi):
    """A bounded pass over every operation: requests drawn from the document (in and out of its limits), each
    answer a 4xx or a 2xx as declared, never a 5xx."""
    schemathesis, schema = openapi
    failures, statuses = [], {}
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            statuses[operation.label] = statuses_of(schemathesis, operation, 25)
        except Exception as e:  # noqa: BLE001 - every operation's failures reported together
            causes = [str(x).strip()[:300] or type(x).__name__ for x in getattr(e, "exceptions", None) or [e]]
            failures.append(f"{operation.label}: {str(e).strip()[:200]} {causes}")  # hypothesis groups its failures
    assert not failures, "\n".join(failures)
    assert len(statuses) >= 30 and all(seen and max(seen) < 500 for seen in statuses.values()), statuses
    for label in ("POST /sdapi/v1/txt2img", "POST /sdapi/v1/img2img", "POST /v1/generate"):
        assert 200 in statuses[label], (label, statuses[label])  # the document's example, within the limits, works
