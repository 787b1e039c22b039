"""One request schema behind every front door: the same bad value is refused by the Python constructor, the CLI,
the native API, A1111's API, the web UI's handler and a batch line, each naming the field as its user wrote it;
and the errors' one description."""

import ast
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from stylegrad.aesthetic.options import StyleOptions
from stylegrad.apps.cli import main
from stylegrad.errors import RequestError, StylegradError, describe, first_line
from stylegrad.jobs.batchfile import read_jobs
from stylegrad.pipelines.limits import MAX_PROMPT_CHARS, MAX_SEED, SERVER, Limits
from stylegrad.pipelines.request import GenerationRequest, build, check, implied_size

ROOT = Path(__file__).resolve().parents[1]

# (case, the schema's values, the field that must be named); every door gets the same values in its own shape
CASES = [
    ("negative seed", {"seed": -5}, "seed"),
    ("seed past 2**32", {"seed": 2**32}, "seed"),
    ("style lr 5", {"style_options": {"lr": 5.0}}, "style_options.lr"),
    ("infinite regularization", {"style_options": {"regularization": math.inf}}, "style_options.regularization"),
    ("LoRA multiplier nan", {"loras": ["inked:nan"]}, "loras[0]"),
    ("LoRA multiplier 1e308", {"loras": ["inked:1e308"]}, "loras[0]"),
    ("LoRA tag nan", {"prompt": "a house <lora:inked:nan>"}, "prompt"),
    ("prompt too long", {"prompt": "a " * (MAX_PROMPT_CHARS // 2 + 1)}, "prompt"),
    ("infinite cfg", {"cfg": math.inf}, "cfg"),
    ("width not a multiple of 8", {"width": 30}, "width"),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A server over a stand-in model: every case must be refused before a job would reach it."""
    pytest.importorskip("fastapi")
    from stylegrad.apps.serve.service import Service
    from stylegrad.apps.serve.settings import ServeSettings

    root = tmp_path_factory.mktemp("doors")
    for folder, name in (("styles", "stripes.safetensors"), ("Lora", "inked.safetensors")):
        (root / folder).mkdir()
        (root / folder / name).write_bytes(b"never read: every case is refused first")
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=4)), vae_scale_factor=8)
    generator = SimpleNamespace(model="tiny-model", pipe=pipe, siglip_model=None)
    settings = ServeSettings(styles_dirs=(str(root / "styles"),), loras_dirs=(str(root / "Lora"),), ui=False)
    s = Service(generator, settings)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    from stylegrad.apps.serve.app import create_app

    with TestClient(create_app(service)) as c:
        yield c


def _python(values):
    values = dict(values)
    if "style_options" in values:
        values["style_options"] = StyleOptions(**values["style_options"])
    with pytest.raises(RequestError) as e:
        GenerationRequest(**{"prompt": "a house", **values})
    return e.value.field, str(e.value)


def _cli(values, tmp_path):
    from stylegrad.apps.cli.errors import flag

    values = {"prompt": "a house", **values}
    argv = ["generate", values.pop("prompt"), "--out", str(tmp_path)]
    for key, value in values.items():
        if key == "style_options":
            for k, v in value.items():
                argv += [flag(f"style_options.{k}"), str(v)]
        elif key == "loras":
            argv += [x for spec in value for x in ("--lora", spec)]
        else:
            argv += [flag(key), str(value)]
    return argv


def _post(client, path: str, body: dict):
    """As a client that writes Infinity and NaN (Python's json does; httpx's refuses to)."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _native(values, client):
    r = _post(client, "/v1/generate", {"prompt": "a house", "steps": 2, "width": 32, "height": 32, **values})
    assert r.status_code == 422, r.text
    return r.json()["field"], r.json()["error"]


A1111_STYLE = {"style_options.lr": "aesthetic_lr", "style_options.steps": "aesthetic_steps"}


def _a1111(values, client):
    """A1111's names: LoRAs only as prompt tags, style options only as the extension's arguments."""
    body = {"prompt": "a house", "steps": 2, "width": 32, "height": 32, "sampler_name": "Euler"}
    expected = None
    for key, value in values.items():
        if key == "style_options":
            if set(value) - {"lr", "steps"}:
                return None
            args = {A1111_STYLE[f"style_options.{k}"]: v for k, v in value.items()}
            body["alwayson_scripts"] = {"Aesthetic embeddings": {"args": {"aesthetic_imgs": "stripes", **args}}}
        elif key == "loras":
            body["prompt"] += "".join(f" <lora:{spec}>" for spec in value)
            expected = "prompt"
        else:
            body[{"cfg": "cfg_scale"}.get(key, key)] = value
    r = _post(client, "/sdapi/v1/txt2img", body)
    assert r.status_code == 422, r.text
    return r.json()["field"], r.json()["error"], expected


def _ui(values, service):
    """The web UI's Generate button, called as Gradio calls it (what its widgets can send)."""
    gr = pytest.importorskip("gradio")
    from stylegrad.apps.serve.ui import _actions

    args = dict(prompt="a house", negative="", style="(none)", style_steps=10, style_lr=1e-4, style_weight=1.0,
                stylecode="", code_image=None, loras=[], lora_weight=1.0, seed=0, width=32, height=32, steps=2,
                cfg=7.0, sampler=None, compare=False)
    for key, value in values.items():
        if key == "style_options":
            if set(value) - {"lr"}:
                return None
            args["style_lr"] = value["lr"]
        elif key == "loras":
            name, _, weight = value[0].partition(":")
            args["loras"], args["lora_weight"] = [name], float(weight)
        else:
            args[key] = value
    with pytest.raises(gr.Error) as e:
        _actions(service).generate(**args)
    return e.value.message if hasattr(e.value, "message") else str(e.value)


def _batch(values, tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps({"prompt": "a house", "steps": 2, **values}) + "\n")
    items, bad = read_jobs(jobs, "tiny-model")
    assert not items and len(bad) == 1
    return bad[0].reason


DOORS = ["python", "cli", "native", "a1111", "ui", "batch"]
# what a door cannot express at all: A1111's API and the web page have no regularization field
CANNOT_SAY = {("a1111", "infinite regularization"), ("ui", "infinite regularization")}


@pytest.mark.parametrize("door,values,field", [pytest.param(d, *c[1:], id=f"{d}-{c[0]}") for d in DOORS for c in CASES
                                               if (d, c[0]) not in CANNOT_SAY])
def test_every_door_refuses_the_same_bad_value_naming_the_field(door, values, field, service, client, tmp_path,
                                                                 capsys):
    if door == "python":
        got, message = _python(values)
        assert got == field and message.startswith(field)
    elif door == "cli":
        from stylegrad.apps.cli.errors import flag

        assert main(_cli(values, tmp_path)) == 1
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("Error: ")]
        assert line.startswith(f"Error: {flag(field)}"), line
        assert not list(tmp_path.glob("*.png"))
    elif door == "native":
        got, message = _native(values, client)
        assert got == field and message.startswith(field)
    elif door == "a1111":
        from stylegrad.apps.serve.a1111 import NAMES

        result = _a1111(values, client)
        assert result is not None, "this door cannot say that value: list it in CANNOT_SAY"
        got, message, expected = result
        expected = expected or NAMES.get(field, field)
        assert got == expected and message.startswith(expected)
    elif door == "ui":
        from stylegrad.apps.serve.ui import LABELS

        message = _ui(values, service)
        assert message is not None, "this door cannot say that value: list it in CANNOT_SAY"
        assert message.startswith(LABELS.get(field.split("[")[0], field)), message
    else:
        assert _batch(values, tmp_path).startswith(field)


def test_the_size_an_init_image_implies_is_checked(client):
    """No width or height: the picture is the init image's size, and it must fit max_side too."""
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (2560, 64)).save(buf, format="PNG")
    wide = base64.b64encode(buf.getvalue()).decode()
    r = client.post("/v1/generate", json={"prompt": "a house", "steps": 2, "init_image": wide})
    assert r.status_code == 422 and r.json()["field"] == "init_image" and "2560x64" in r.json()["error"]
    r = client.post("/sdapi/v1/img2img", json={"prompt": "a house", "steps": 2, "init_images": [wide],
                                               "width": 2560, "height": 64})
    assert r.status_code == 422 and r.json()["field"] == "width"
    request = GenerationRequest("a house", width=512)
    assert implied_size(request, (2560, 67)) == (512, 64)
    with pytest.raises(RequestError, match="init_image"):
        check(GenerationRequest("a house"), Limits(max_side=2048), init_size=(2560, 64))
    with pytest.raises(RequestError, match="init_image"):
        check(GenerationRequest("a house"), init_size=(5, 64))  # would be 0 pixels wide
    assert check(GenerationRequest("a house", width=512, height=64), Limits(max_side=2048), init_size=(2560, 64))


def test_every_request_field_reaches_the_native_api(service):
    """A field added to GenerationRequest is a field of /v1/generate too (stylecode_guidance once was not)."""
    from dataclasses import fields

    from stylegrad.apps.serve.native import SERVER_SET, Generate, to_request

    assert {f.name for f in fields(GenerationRequest)} - set(SERVER_SET) <= set(Generate.model_fields)
    request = to_request(Generate(prompt="a house", stylecode_guidance=True, weighting=False, seed=3), service)
    assert request.stylecode_guidance is True and request.weighting is False and request.seed == 3
    assert request.model == "tiny-model" and request.steps == GenerationRequest("x").steps  # the schema's default


def test_seeds_minus_one_is_random_where_a_door_allows_it():
    a, b = (build({"prompt": "x", "seed": -1}, random_seed_allowed=True).seed for _ in range(2))
    assert 0 <= a <= MAX_SEED and 0 <= b <= MAX_SEED and a != b
    with pytest.raises(RequestError, match="seed"):
        build({"prompt": "x", "seed": -1})
    with pytest.raises(RequestError, match=r"seed \+ n - 1"):
        build({"prompt": "x", "seed": MAX_SEED}, n=2)


def test_build_names_unknown_fields_and_resolves_names():
    with pytest.raises(RequestError) as e:
        build({"prompt": "x", "colour": "red"})
    assert e.value.field == "colour" and "unknown field colour" in str(e.value)
    with pytest.raises(RequestError) as e:
        build({"prompt": "x", "style_options": {"colour": 1}})
    assert e.value.field == "style_options.colour"

    class Upper:
        def style(self, name):
            if name == "bad":
                raise StylegradError("style 'bad' is not in this server's style folders")
            return name.upper()

        def lora(self, spec):
            return "/loras/" + spec

        def embedding(self, name):
            return name

    r = build({"prompt": "x", "style": "mine", "loras": ["ink:0.5"]}, names=Upper())
    assert r.style == "MINE" and r.loras == ("/loras/ink:0.5",)
    with pytest.raises(RequestError) as e:
        build({"prompt": "x", "style": "bad"}, names=Upper())
    assert e.value.field == "style" and "not in this server's style folders" in str(e.value)


def test_limits_live_in_one_place():
    from stylegrad.apps.serve.settings import ServeSettings

    assert ServeSettings().limits == SERVER
    assert ServeSettings(max_side=256).limits.max_side == 256
    with pytest.raises(StylegradError, match="max_side"):
        ServeSettings(max_side=0)
    r = GenerationRequest("x", steps=151)
    with pytest.raises(RequestError, match="steps must be at most 150"):
        check(r, SERVER)
    assert check(r) is r  # the library and the CLI: the schema's limits only


def test_one_description_of_errors():
    e = RequestError("width", "must be a positive multiple of 8, got 30")
    assert describe(e) == "width must be a positive multiple of 8, got 30"
    assert str(e.renamed("--width")) == "--width must be a positive multiple of 8, got 30"
    assert str(RequestError("stylecode_image", "give stylecode or {field}, not both")).startswith("give stylecode")
    assert first_line(ValueError("one\ntwo")) == "one" and first_line(ValueError()) == "ValueError"
    assert describe(MemoryError()).startswith("out of memory") and "--" not in describe(MemoryError())
    assert describe(KeyError("k")).startswith("unexpected KeyError")


def test_the_errors_module_imports_no_torch():
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('e', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert 'torch' not in sys.modules; print(m.describe(MemoryError()))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "stylegrad" / "errors.py")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("out of memory"), r.stderr


def test_the_apis_do_not_import_the_app():
    """app.py imports a1111.py and native.py; they import the shared error handling, never app.py."""
    for name in ("a1111.py", "native.py", "ui.py", "errors.py", "service.py"):
        tree = ast.parse((ROOT / "stylegrad" / "apps" / "serve" / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "app" not in imported and "stylegrad.apps.serve.app" not in imported, name


def test_a1111_script_arguments_that_are_not_numbers_are_named(client):
    for value in (math.inf, "many"):
        args = {"aesthetic_imgs": "stripes", "aesthetic_steps": value}
        r = _post(client, "/sdapi/v1/txt2img", {"prompt": "a house", "alwayson_scripts": {
            "Aesthetic embeddings": {"args": args}}})
        assert r.status_code == 422 and r.json()["field"] == "aesthetic_steps", r.text
