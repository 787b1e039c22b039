"""The Cog predictor served as Cog 0.23 serves it without Docker (``python -m cog.server.http``, the schema written
by ``stylegrad.apps.cog.schema``), on the tiny model: plain, styled by a paper embedding's name, styled by the
user's own pictures, with a LoRA and an embedding; every bad input a 422 from Cog's schema or one clean line, never
a traceback. The predictor is a thin layer: its pixels are ``Generator.images``' for the same request."""

import ast
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tokenize
import urllib.error
import urllib.request
import zipfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("cog")
from test_addons_generate import write_kohya  # noqa: E402
from tiny import PROJ  # noqa: E402

from stylegrad import Style, load_style, save_style  # noqa: E402
from stylegrad.aesthetic.options import StyleOptions  # noqa: E402
from stylegrad.apps.cog import inputs, paper, pictures, schema  # noqa: E402
from stylegrad.errors import RequestError, StylegradError  # noqa: E402
from stylegrad.files.infotext import parse_infotext  # noqa: E402
from stylegrad.pipelines.limits import SERVER  # noqa: E402
from stylegrad.pipelines.loading import SAMPLERS  # noqa: E402

PREDICTOR = Path(schema.__file__).with_name("predictor.py")
SMALL = {"width": 32, "height": 32, "ddim_steps": 2, "plms": False}  # DDIM, 2 steps: fast on the tiny model
READY_WITHIN = 90  # seconds: the worker imports torch and diffusers and loads the model once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(raw: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def png(color, size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def decoded(uri: str) -> bytes:
    return base64.b64decode(uri.split(",", 1)[1])


def image(uri: str) -> Image.Image:
    im = Image.open(io.BytesIO(decoded(uri)))
    im.load()
    return im


@pytest.fixture(scope="module")
def served(world, tmp_path_factory):
    """The predictor behind Cog's HTTP server (a free port on 127.0.0.1), READY: the tiny model as the deployment's
    model, a styles folder holding a (tiny-width) 'sac_8plus' as a deployment keeps the paper's embeddings."""
    clip_dir, sd_dir = world
    root = tmp_path_factory.mktemp("cog")
    styles = root / "styles"
    save_style(Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(3)), name="sac_8plus"),
               styles / "sac_8plus.safetensors")
    schema.write(root / ".cog" / "openapi_schema.json")  # what `cog build` writes; Cog validates inputs with it
    port = free_port()
    env = {**os.environ, "COG_PREDICT_TYPE_STUB": f"{PREDICTOR}:Predictor", "PORT": str(port),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],  # the worker runs `python`
           "STYLEGRAD_MODEL": str(sd_dir), "STYLEGRAD_CLIP_MODEL": str(clip_dir), "STYLEGRAD_STYLES_DIR": str(styles),
           "STYLEGRAD_DEVICE": "cpu"}
    log = open(root / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"], cwd=root, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + READY_WITHIN, None
        while time.monotonic() < deadline and status not in ("READY", "SETUP_FAILED") and server.poll() is None:
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(base + "/health-check", timeout=5) as r:
                    status = json.load(r)["status"]
            except OSError:
                pass
        if status != "READY":
            pytest.fail(f"the Cog server is not ready ({status}): {(root / 'server.log').read_text()[-3000:]}")
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # the server and the worker it started, nothing else
            server.wait()
        log.close()


def predict(base: str, **given) -> tuple[int, dict]:
    """(HTTP status, body) of one prediction. Cog answers 409 while its one slot is still being released after the
    last prediction (right after a failed one, for a moment): a client waits and asks again."""
    request = urllib.request.Request(base + "/predictions", data=json.dumps({"input": given}).encode(),
                                     headers={"Content-Type": "application/json"})
    for _ in range(100):
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            if e.code != 409:
                return e.code, json.load(e)
        time.sleep(0.1)
    raise AssertionError("the Cog server stayed busy for 10 s")


def succeeded(base: str, **given) -> list[str]:
    code, body = predict(base, **given)
    assert code == 200 and body["status"] == "succeeded", body
    return body["output"]


def test_plain_prediction_is_the_librarys_image_with_its_infotext(served, world):
    from stylegrad.pipelines.generation import Generator
    from stylegrad.pipelines.request import build

    out = succeeded(served, prompt="a red triangle", seed=7, aesthetic_steps=0, negative_prompt="blur", scale=6.0,
                    **SMALL)
    assert len(out) == 1 and out[0].startswith("data:image/png")
    im = image(out[0])
    text = im.info["parameters"]
    assert im.size == (32, 32)
    assert text.startswith("a red triangle\nNegative prompt: blur\n")
    for field in ("Steps: 2", "Sampler: DDIM", "CFG scale: 6.0", "Seed: 7", "Size: 32x32"):
        assert field in text
    assert "Aesthetic" not in text
    clip_dir, sd_dir = world
    request = build(dict(prompt="a red triangle", negative="blur", seed=7, steps=2, cfg=6.0, width=32, height=32,
                         sampler="ddim", model=str(sd_dir), clip_model=str(clip_dir), style_options={"steps": 0}))
    [(expected, _)] = Generator.load(str(sd_dir), "cpu", str(clip_dir)).images(request)
    assert np.array_equal(np.asarray(im), np.asarray(expected))


def test_a_paper_embedding_by_name_styles_every_sample(served):
    plain = succeeded(served, prompt="a red triangle", seed=5, n_samples=2, aesthetic_steps=0, **SMALL)
    styled = succeeded(served, prompt="a red triangle", seed=5, n_samples=2, aesthetic_steps=3, aesthetic_lr=0.01,
                       **SMALL)
    assert len(styled) == 2
    for i, uri in enumerate(styled):
        text = image(uri).info["parameters"]
        assert f"Seed: {5 + i}" in text and "Aesthetic embedding: sac_8plus" in text
        assert "Aesthetic steps: 3" in text and "Aesthetic LR: 0.01" in text
        assert not np.array_equal(np.asarray(image(uri)), np.asarray(image(plain[i])))  # the style acts


def test_own_pictures_become_a_style_returned_beside_the_images(served):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("mine/a.png", png("red"))
        z.writestr("mine/b.png", png("navy"))
        z.writestr("__MACOSX/mine/._a.png", b"resource fork")  # not a picture: skipped
        z.writestr("readme.txt", "not a picture")
    out = succeeded(served, prompt="a red triangle", seed=1, aesthetic_steps=2,
                    style_images=[data_uri(archive.getvalue(), "application/zip"), data_uri(png("gold"), "image/png")],
                    **SMALL)
    assert len(out) == 2 and out[0].startswith("data:image/png")
    style_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"cog-style-{os.getpid()}.safetensors"
    style_file.write_bytes(decoded(out[1]))
    try:
        style = load_style(style_file)
    finally:
        style_file.unlink()
    assert style.width == PROJ and style.metadata["num_images"] == "3"
    assert f"Aesthetic embedding hash: {style.digest}" in image(out[0]).info["parameters"]


def test_loras_and_embeddings_are_uploaded_files(served, tmp_path):
    lora = write_kohya(tmp_path / "inked.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 32) * 0.05}, "name": "glossy"}, tmp_path / "glossy.pt")
    out = succeeded(served, prompt="a glossy triangle", seed=2, aesthetic_steps=0, lora_scale=0.5,
                    lora_files=[data_uri(lora.read_bytes())], embedding_files=[data_uri((tmp_path / "glossy.pt")
                                                                                      .read_bytes())],
                    embedding_tokens="glossy", **SMALL)
    _, _, recorded = parse_infotext(image(out[0]).info["parameters"])
    assert recorded["Lora hashes"] and recorded["TI hashes"].startswith("glossy: ")
    assert recorded["Lora files"].endswith(":0.5") and recorded["Embedding files"].endswith(":glossy")


def test_an_init_image_makes_an_image_of_its_size(served):
    out = succeeded(served, prompt="a red triangle", seed=3, aesthetic_steps=0, strength=0.5,
                    init_image=data_uri(png("teal", (48, 40)), "image/png"),
                    **{k: v for k, v in SMALL.items() if k not in ("width", "height")})
    im = image(out[0])
    assert im.size == (48, 40) and "Denoising strength: 0.5" in im.info["parameters"]


# (inputs, the input Cog's schema names): refused by Cog before the predictor runs
SCHEMA_REFUSES = [
    ({"ddim_steps": 0}, "ddim_steps"),
    ({"ddim_steps": SERVER.max_steps + 1}, "ddim_steps"),
    ({"n_samples": SERVER.max_images + 1}, "n_samples"),
    ({"width": SERVER.max_side + 8}, "width"),
    ({"aesthetic_steps": SERVER.max_style_steps + 1}, "aesthetic_steps"),
    ({"aesthetic_embedding": "vaporwave"}, "aesthetic_embedding"),
    ({"sampler": "Euler b"}, "sampler"),
    ({"scale": "high"}, "scale"),
    ({"device": "tpu"}, "device"),
    ({"aesthetic_towers": "h"}, "aesthetic_towers"),
]


@pytest.mark.parametrize("given, field", SCHEMA_REFUSES, ids=[f for _, f in SCHEMA_REFUSES])
def test_cogs_schema_refuses_with_a_422_naming_the_input(served, given, field):
    code, body = predict(served, prompt="a red triangle", **{**SMALL, **given})
    assert code == 422, body
    assert [d["loc"] for d in body["detail"]] == [["body", "input", field]]


def test_a_missing_prompt_is_a_422(served):
    code, body = predict(served, **SMALL)
    assert code == 422 and body["detail"][0]["loc"] == ["body", "input", "prompt"]
    assert body["detail"][0]["msg"] == "Field required"


# (inputs, what the one error line says): what only the library can check, a failed prediction naming the input
LIBRARY_REFUSES = [
    ({"width": 36}, "width must be a positive multiple of 8, got 36"),
    ({"aesthetic_lr": 0}, "aesthetic_lr must be in (0, 1], got 0"),
    ({"aesthetic_embedding": "aivazovsky"}, "aesthetic_embedding aivazovsky: aivazovsky.pt is not in this "
                                            "deployment's styles folders"),
    ({"style_file": data_uri(b"not a style")}, "style_file: "),
    ({"style_images": [data_uri(b"PK\x03\x04 a broken zip")]}, "style_images: none of the 1 files is a readable"),
    ({"embedding_files": [data_uri(b"x")]}, "embedding_tokens: give one trigger word per embedding file"),
    ({"stylecode": "not a code"}, "stylecode"),
    ({"model": "no-such-org/no-such-model"}, "model: "),
    ({"model_file": data_uri(b"not weights")}, "model_file: "),
    ({"aesthetic_beta2": 0.999999, "aesthetic_eps": 0}, "aesthetic_eps must be in (0, 1], got 0"),
    ({"model": "no-such-org/no-such-model", "scale": 7, "width": 12}, "width must be a positive multiple of 8"),  # first
]


@pytest.mark.parametrize("given, line", LIBRARY_REFUSES, ids=[next(iter(g)) for g, _ in LIBRARY_REFUSES])
def test_what_the_library_refuses_is_one_line_naming_the_input(served, given, line):
    code, body = predict(served, prompt="a red triangle", **{**SMALL, **given})
    assert code == 200 and body["status"] == "failed", body
    assert line in body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"] + body["logs"]


def test_the_deployment_model_is_back_after_another_was_refused(served):
    assert predict(served, prompt="x", model="no-such-org/no-such-model", **SMALL)[1]["status"] == "failed"
    assert len(succeeded(served, prompt="a red triangle", aesthetic_steps=0, **SMALL)) == 1


# -- the schema and the predictor's literals, without a server ----------------------------------------------------
@pytest.fixture(scope="module")
def document():
    return schema.openapi_schema()


def test_the_schema_is_the_predictors_and_keeps_the_published_models_inputs(document):
    props = document["components"]["schemas"]["Input"]["properties"]
    published = {"prompt": None, "n_samples": 1, "width": None, "height": None, "scale": 7.5, "ddim_steps": 50,
                 "plms": True, "aesthetic_embedding": "sac_8plus", "aesthetic_steps": 10, "seed": None}
    for name, default in published.items():
        assert props[name].get("default") == default, name
    assert document["components"]["schemas"]["Input"]["required"] == ["prompt"]
    assert document["components"]["schemas"]["aesthetic_embedding"]["enum"] == [*paper.NAMES, paper.NONE]
    assert document["components"]["schemas"]["sampler"]["enum"] == [a1111 for _, a1111, _ in SAMPLERS.values()]
    assert document["components"]["schemas"]["Output"]["items"] == {"type": "string", "format": "uri"}


def test_every_style_option_is_an_input_with_its_default_and_the_servers_limits(document):
    props = document["components"]["schemas"]["Input"]["properties"]
    defaults = StyleOptions()
    expected = {f"aesthetic_{f.name}": getattr(defaults, f.name) for f in fields(StyleOptions) if f.name != "betas"}
    expected.update(aesthetic_text="", aesthetic_beta1=defaults.betas[0], aesthetic_beta2=defaults.betas[1])  # no text
    assert {name: props[name]["default"] for name in expected} == expected
    assert props["aesthetic_lr"]["default"] == 1e-4
    limits = {"width": SERVER.max_side, "height": SERVER.max_side, "ddim_steps": SERVER.max_steps,
              "aesthetic_steps": SERVER.max_style_steps, "n_samples": SERVER.max_images}
    assert {name: props[name]["maximum"] for name in limits} == limits


def test_the_signature_is_literal_as_cogs_go_parser_reads_it():
    """``cog build`` reads run()'s ``Input`` arguments from the source, never running it: literals or this module's
    constants (ge/le: number literals only), and one string literal per text (it does not join "a" "b")."""
    source = PREDICTOR.read_text()
    tree = ast.parse(source)
    constants = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets}
    run = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "run")
    assert len(run.args.defaults) == len(run.args.args) - 1  # every input has an Input(...)
    number = lambda v: isinstance(v, ast.Constant) or (isinstance(v, ast.UnaryOp) and isinstance(v.operand, ast.Constant))
    for default in run.args.defaults:
        assert isinstance(default, ast.Call) and default.func.id == "Input"
        for kw in default.keywords:
            literal = number(kw.value) or (kw.arg not in ("ge", "le") and isinstance(kw.value, ast.Name)
                                           and kw.value.id in constants)
            assert literal, ast.unparse(kw)
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)]
    assert not [a.start for a, b in zip(tokens, tokens[1:]) if a.type == b.type == tokenize.STRING]


def test_the_schema_command_writes_the_document(tmp_path, document):
    out = tmp_path / ".cog" / "openapi_schema.json"
    assert schema.main([str(out)]) == 0
    assert json.loads(out.read_text()) == document


def test_request_fields_are_named_as_the_cog_inputs():
    assert inputs.cog_name("cfg") == "scale" and inputs.cog_name("steps") == "ddim_steps"
    assert inputs.cog_name("style_options.lr") == "aesthetic_lr"
    assert inputs.cog_name("style_options.betas[1]") == "aesthetic_beta2"
    assert inputs.cog_name("loras[0]") == "lora_files[0]" and inputs.cog_name("seed") == "seed"
    assert str(inputs.renamed(RequestError("negative", "must be text, got 3"))) == "negative_prompt must be text, got 3"


def test_a_zips_member_paths_are_never_used(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../../escaped.png", png("red"))
        z.writestr("/abs/also.png", png("blue"))
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    found = pictures.collect([archive], unpacked)
    assert len(found) == 2 and all(p.parent == unpacked for p in found)
    assert not (tmp_path.parent / "escaped.png").exists()
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("notes.txt", "x")
    with pytest.raises(RequestError, match=r"style_images\[0\] is a zip file with no pictures"):
        pictures.collect([empty], unpacked)


def test_a_zip_that_unpacks_too_far_is_refused(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("big.png", bytes(4 << 20))  # 4 MiB of zeros, a few KiB compressed
    monkeypatch.setattr(pictures, "MAX_UNPACKED", 1 << 20)
    with pytest.raises(RequestError, match="unpack to more than 1 MiB"):
        pictures.collect([bomb], tmp_path)


def test_a_weights_url_is_downloaded_once(tmp_path):
    import functools
    import http.server
    import threading

    from stylegrad.apps.cog.models import fetch_weights

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "merged.safetensors").write_bytes(b"weights" * 1000)
    served = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            served.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(tmp_path / "site")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/merged.safetensors"
        first = fetch_weights(url, tmp_path / "cache")
        assert first.name == "merged.safetensors" and first.read_bytes() == b"weights" * 1000
        assert fetch_weights(url, tmp_path / "cache") == first and len(served) == 1  # the second time: the cache
        with pytest.raises(StylegradError, match="cannot download"):
            fetch_weights(url.replace("merged", "missing"), tmp_path / "cache")
    finally:
        server.shutdown()
        server.server_close()


def test_importing_the_package_loads_neither_cog_nor_torch():
    code = "import sys, stylegrad.apps.cog; print('torch' in sys.modules, 'cog' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.split() == \
        ["False", "False"]
