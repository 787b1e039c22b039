"""IP-Adapter through every door of ``stylegrad serve`` and batch files: A1111's ControlNet units as the
``webuiapi`` client and raw JSON send them, the extension's lists, the native API, a JSONL line and the web UI.
Each image equals ``Generator.images`` on the same request with the same pictures as files; what cannot be
honoured is one line naming the field the client sent."""

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from ipadapter_files import write_adapter, write_image_encoder  # noqa: E402
from test_serve import dirs, generator, make_client  # noqa: E402, F401
from test_serve_robust import live, one_shape  # noqa: E402

from stylegrad import GenerationRequest  # noqa: E402
from stylegrad.apps.serve.controlnet import legacy_hash  # noqa: E402

PROMPT = "a red house"
IMAGE_WIDTH = 16  # the tiny encoder's image embedding, what the tiny adapter reads
SMALL = dict(seed=7, steps=2, width=32, height=32)
A1111 = dict(prompt=PROMPT, cfg_scale=7.0, sampler_name="Euler a", **SMALL)
NAME = "ip-adapter_tiny"


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """The pictures' embedding cache in a folder of this module's, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STYLEGRAD_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def files(generator, tmp_path_factory):  # noqa: F811
    """An ipadapter folder with the tiny adapter, a clip_vision folder of the server's elsewhere, two pictures."""
    root = tmp_path_factory.mktemp("ip")
    adapter = write_adapter(root / "ipadapter" / f"{NAME}.safetensors", generator.pipe.unet, IMAGE_WIDTH)
    encoder = write_image_encoder(root / "clip_vision" / "tiny-vit", IMAGE_WIDTH)
    examples = sorted((Path(__file__).resolve().parents[1] / "stylegrad" / "world" / "examples").glob("*.png"))
    pictures = []
    for i, p in enumerate(examples[:3]):
        pictures.append(root / f"picture-{i}.png")
        Image.open(p).convert("RGB").save(pictures[-1])
    return {"root": root, "adapter": adapter, "encoder": encoder, "pictures": pictures}


def ip_client(generator, dirs, world, files):  # noqa: F811
    return make_client(generator, dirs, world, ipadapter_dirs=(str(files["adapter"].parent),),
                       clip_vision_dirs=(str(files["encoder"].parent),), max_ip_images=3)


@pytest.fixture(scope="module")
def client(generator, dirs, world, files):  # noqa: F811
    c, _ = ip_client(generator, dirs, world, files)
    with c:
        yield c


@pytest.fixture(scope="module")
def expected(generator, files):  # noqa: F811
    """The library's image for (picture indices, scale, init picture index), made once each."""
    made = {}

    def image(indices: tuple[int, ...], scale: float = 0.8, init: int | None = None) -> np.ndarray:
        key = (indices, scale, init)
        if key not in made:
            pics = files["pictures"]
            extra = dict(init_image=str(pics[init]), strength=0.75) if init is not None else {}
            request = GenerationRequest(PROMPT, cfg=7.0, sampler="euler_a", model=str(generator.model), **SMALL,
                                        ip_adapter=str(files["adapter"]), ip_images=tuple(str(pics[i]) for i in indices),
                                        ip_scale=scale, ip_image_encoder=str(files["encoder"]), **extra)
            made[key] = pixels(generator.images(request)[0][0])
        return made[key]

    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def b64(path, data_url: bool = False) -> str:
    text = base64.b64encode(path.read_bytes()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def answer_image(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return pixels(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))))


def unit(**fields) -> dict:
    return {"alwayson_scripts": {"controlnet": {"args": [fields]}}}


# -- A1111: webuiapi and raw JSON ---------------------------------------------------------------------------------
def test_webuiapi_controlnet_unit_and_the_extensions_lists(files, expected, generator, dirs, world):  # noqa: F811
    webuiapi = pytest.importorskip("webuiapi")
    with live(ip_client(generator, dirs, world, files)[0].app) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        title = f"{NAME} [{legacy_hash(files['adapter'])}]"
        assert api.controlnet_model_list() == [title]  # 'NAME [HASH]', as the extension lists its models
        assert "ip-adapter_clip_sd15" in api.controlnet_module_list() and api.controlnet_version() == 3
        assert "controlnet" in api.get_scripts()["txt2img"]
        picture = Image.open(files["pictures"][0])
        cn = webuiapi.ControlNetUnit(image=picture, module="ip-adapter_clip_sd15", model=title, weight=0.8)
        # alwayson_scripts given: webuiapi writes the units into it, and into its shared default dict otherwise
        result = api.txt2img(prompt=PROMPT, cfg_scale=7.0, sampler_name="Euler a", controlnet_units=[cn],
                             alwayson_scripts={}, **SMALL)
    assert np.array_equal(pixels(result.image), expected((0,)))
    plain = pixels(generator.images(GenerationRequest(PROMPT, cfg=7.0, sampler="euler_a", **SMALL))[0][0])
    assert np.abs(plain - expected((0,))).mean() > 1  # the picture acted
    assert "IP-Adapter scale: 0.8" in result.info["infotexts"][0]


def test_raw_json_units_in_every_form_the_extension_reads(client, files, expected):
    pics = files["pictures"]
    one = {"module": "ip-adapter_clip_h", "model": NAME.upper(), "weight": 0.8,  # no 'enabled': on, with a model
           "image": {"image": b64(pics[0], data_url=True), "mask": None},
           "resize_mode": "Crop and Resize", "pixel_perfect": True, "processor_res": 512, "control_mode": 2,
           "low_vram": True, "threshold_a": 64, "hr_option": "Both"}  # accepted, and nothing to change here
    r = client.post("/sdapi/v1/txt2img", json={**A1111, **unit(**one)})
    assert np.array_equal(answer_image(r), expected((0,)))

    both = {**expected_unit(pics, [0, 1])}
    averaged = answer_image(client.post("/sdapi/v1/txt2img", json={**A1111, **unit(**both)}))
    assert np.array_equal(averaged, expected((0, 1)))
    units = [{"enabled": True, "module": "ip-adapter_clip_sd15", "model": NAME, "weight": 0.8, "input_image": b64(pics[0])},
             {"enabled": False, "module": "canny", "model": "control_v11p_sd15_canny", "image": "not even base64"},
             {"enabled": True, "module": "ip-adapter-auto", "model": f"{NAME} [{legacy_hash(files['adapter'])}]",
              "weight": 0.8, "image": b64(pics[1]), "mask": None},
             {"enabled": True, "module": "none", "model": "None", "image": ""}]  # webuiapi's empty unit
    r = client.post("/sdapi/v1/txt2img", json={**A1111, "alwayson_scripts": {"ControlNet": {"args": units}}})
    assert np.array_equal(answer_image(r), averaged)  # two units of one adapter: their pictures averaged


def expected_unit(pics, indices) -> dict:
    return {"enabled": True, "module": "ip-adapter_clip_sd15", "model": NAME, "weight": 0.8,
            "image": [{"image": b64(pics[i]), "mask": None} for i in indices]}


def test_img2img_unit_without_a_picture_takes_the_init_image(client, files, expected):
    body = {**A1111, "init_images": [b64(files["pictures"][2])], "denoising_strength": 0.75,
            **unit(enabled=True, module="ip-adapter_clip_sd15", model=NAME, weight=0.8)}
    assert np.array_equal(answer_image(client.post("/sdapi/v1/img2img", json=body)), expected((2,), init=2))


def _png(color, size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


REFUSALS = [  # (the unit's fields over a good one, the field named, a piece of the line)
    ({"model": "ip-adapter_missing"}, "args[0].model", "no IP-Adapter 'ip-adapter_missing'"),
    ({"model": "control_v11p_sd15_canny [d14c016b]"}, "args[0].model", "not an IP-Adapter model"),
    ({"model": f"{NAME} [0123abcd]"}, "args[0].model", "another hash"),
    ({"module": "canny"}, "args[0].module", "IP-Adapter units only"),
    ({"module": "ip-adapter_face_id_plus"}, "args[0].module", "face-ID"),
    ({"image": "bm90IGFuIGltYWdl"}, "args[0].image", "not a readable image"),
    ({"image": "%%%"}, "args[0].image", "not valid base64"),
    ({"image": [_png((0, 0, 0)), _png((255, 255, 255))]}, "args[0].image.mask", "masks are not supported"),
    ({"guidance_end": 0.5}, "args[0].guidance_start", "part of the steps"),
    ({"advanced_weighting": [1.0] * 16}, "args[0].advanced_weighting", "not supported"),
    ({"ipadapter_input": "gASVAAAAAA=="}, "args[0].ipadapter_input", "not supported"),
    ({"weight": 50}, "args[0].weight", "must be in [0, 10]"),
]


@pytest.mark.parametrize("change, field, words", REFUSALS, ids=[r[1].split(".")[-1] + "-" + r[2][:12] for r in REFUSALS])
def test_a1111_refusals_are_one_line_naming_the_field(client, files, change, field, words):
    good = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": NAME, "weight": 0.8,
            "image": b64(files["pictures"][0])}
    r = client.post("/sdapi/v1/txt2img", json={**A1111, **unit(**{**good, **change})})
    assert r.status_code == 422, r.text
    body = one_shape(r)
    assert body["field"] == f"alwayson_scripts['controlnet'].{field}" and words in body["error"], body


def test_two_adapters_and_too_many_pictures_are_refused(client, files):
    pics = files["pictures"]
    other = files["root"] / "ipadapter" / "ip-adapter_other.safetensors"
    shutil.copy(files["adapter"], other)
    try:
        units = [{"enabled": True, "module": "ip-adapter_clip_sd15", "model": m, "image": b64(pics[0])}
                 for m in (NAME, "ip-adapter_other")]
        body = one_shape(client.post("/sdapi/v1/txt2img", json={**A1111, "alwayson_scripts": {
            "controlnet": {"args": units}}}))
        assert "one request takes one IP-Adapter" in body["error"]
    finally:
        other.unlink()
    many = expected_unit(pics, [0, 1, 2, 0])
    body = one_shape(client.post("/sdapi/v1/txt2img", json={**A1111, **unit(**many)}))
    assert "at most 3 IP-Adapter pictures" in body["error"] and body["field"].endswith("args[0].image")


# -- the native API ------------------------------------------------------------------------------------------------
def test_native_generate_with_reference_pictures(client, files, expected):
    pics = files["pictures"]
    body = {"prompt": PROMPT, "cfg": 7.0, "sampler": "euler_a", **SMALL, "ip_adapter": NAME,
            "ip_images": [b64(pics[0]), b64(pics[1], data_url=True)], "ip_scale": 0.8}
    assert np.array_equal(answer_image(client.post("/v1/generate", json=body)), expected((0, 1)))
    assert client.get("/v1/info").json()["ip_adapters"] == [NAME]
    for change, field in (({"ip_adapter": "../ipadapter/" + NAME}, "ip_adapter"),
                          ({"ip_adapter": "missing"}, "ip_adapter"), ({"ip_images": ["%%%"]}, "ip_images[0]"),
                          ({"ip_scale": -1}, "ip_scale"), ({"ip_images": [b64(pics[0])] * 4}, "ip_images"),
                          ({"ip_image_encoder": "/etc"}, "ip_image_encoder"), ({"ip_adapter": None}, "ip_images")):
        r = client.post("/v1/generate", json={**body, **change})
        assert r.status_code == 422 and one_shape(r)["field"] == field, (change, r.text)


def test_the_openapi_document_states_the_ip_fields_with_limits_and_an_example(client):
    doc = client.get("/openapi.json").json()
    props = doc["components"]["schemas"]["Generate"]["properties"]
    assert props["ip_images"]["maxItems"] == 3 and props["ip_scale"]["maximum"] == 10
    assert "ip_images" in props and props["ip_adapter"]["description"]
    examples = doc["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert examples["ip_adapter"]["value"]["ip_adapter"] == NAME
    a1111 = doc["paths"]["/sdapi/v1/txt2img"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert a1111["ip_adapter"]["value"]["alwayson_scripts"]["controlnet"]["args"][0]["model"] == NAME
    assert doc["info"]["x-limits"]["max_ip_images"] == 3


# -- a batch line and the web UI -----------------------------------------------------------------------------------
def test_a_batch_line_with_paths_beside_the_file(files, expected, generator, tmp_path):  # noqa: F811
    from stylegrad.jobs.batchfile import read_jobs

    shutil.copy(files["adapter"], tmp_path / "adapter.safetensors")
    shutil.copytree(files["encoder"], tmp_path / "encoder")
    shutil.copy(files["pictures"][0], tmp_path / "a.png")
    line = {"prompt": PROMPT, "cfg": 7.0, "sampler": "euler_a", **SMALL, "ip_adapter": "adapter.safetensors",
            "ip_images": "a.png", "ip_scale": 0.8, "ip_image_encoder": "encoder"}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "ip_scale": "x"}) + "\n")
    items, bad = read_jobs(tmp_path / "jobs.jsonl", str(generator.model))
    assert [b.line for b in bad] == [2] and "ip_scale" in bad[0].reason
    request = items[0].request
    assert request.ip_adapter == str(tmp_path / "adapter.safetensors") and request.ip_images == (str(tmp_path / "a.png"),)
    assert request.ip_image_encoder == str(tmp_path / "encoder")
    assert np.array_equal(pixels(generator.images(request)[0][0]), expected((0,)))


def test_the_web_ui_generate_box(generator, dirs, world, files, expected):  # noqa: F811
    pytest.importorskip("gradio")
    from stylegrad.apps.serve.ui import _actions, build_ui

    _, service = ip_client(generator, dirs, world, files)
    ui = build_ui(service)
    by_id = {getattr(b, "elem_id", None): b for b in ui.blocks.values()}
    assert {"ip-images", "ip-adapter", "ip-scale", "ip-style"} <= set(by_id)
    assert NAME in [c[0] if isinstance(c, tuple) else c for c in by_id["ip-adapter"].choices]
    act = _actions(service)
    quiet = lambda *a, **k: None  # noqa: E731
    shown, grid, text = act.generate(PROMPT, "", "(none)", 10, 1e-4, 1.0, "", None, [], 1.0, 7, 32, 32, 2, 7.0,
                                     "Euler a", False, NAME, [str(files["pictures"][0])], 0.8, False, progress=quiet)
    assert grid is None and "IP-Adapter scale: 0.8" in text
    assert np.array_equal(pixels(Image.open(shown[0][0])), expected((0,)))
    with pytest.raises(Exception, match="Reference pictures needs ip_adapter"):
        act.generate(PROMPT, "", "(none)", 10, 1e-4, 1.0, "", None, [], 1.0, 7, 32, 32, 2, 7.0, "Euler a", False,
                     "(none)", [str(files["pictures"][0])], 0.8, False, progress=quiet)
