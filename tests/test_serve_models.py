"""``stylegrad serve`` with a models folder (issue 37): A1111's ``sd_model_checkpoint`` switches among the folder's
checkpoint files, through the one job queue (never under a running generation), the old model freed; options,
sd-models and the images' infotext follow; refresh-checkpoints reads the folder again. Two tiny single-file
checkpoints with different weights stand in for a user's models."""

import gc
import hashlib
import json
import shutil
import threading
import weakref

import numpy as np
import pytest
import torch
from ckpt_layout import write_checkpoint
from tiny import tiny_clip, tiny_pipeline

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import decode  # noqa: E402
from test_serve_robust import live  # noqa: E402

from stylegrad.apps.serve.app import create_app  # noqa: E402
from stylegrad.apps.serve.service import Service  # noqa: E402
from stylegrad.apps.serve.settings import ServeSettings  # noqa: E402
from stylegrad.files.infotext import parse_infotext  # noqa: E402
from stylegrad.pipelines.generation import Generator  # noqa: E402

SMALL = dict(prompt="a red house", steps=2, width=32, height=32, seed=7, sampler_name="Euler a")

pytestmark = pytest.mark.usefixtures("tiny_checkpoint_configs")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A models folder with two SD1 checkpoints of different weights (and a LoRA-sized file it does not offer)."""
    root = tmp_path_factory.mktemp("models")
    clip = tiny_clip(0)
    write_checkpoint(tiny_pipeline(clip, 0), root / "alpha.safetensors")
    write_checkpoint(tiny_pipeline(clip, 1), root / "sub" / "beta.safetensors")
    (root / "notes.safetensors").write_bytes(b"not a checkpoint")
    return root


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def serve(folder, model="alpha.safetensors", loads: list | None = None):
    """A service started on ``model`` with the models folder; ``loads`` records each model the switch loads."""
    generator = Generator.load(str(folder / model), "cpu")
    settings = ServeSettings(models_dir=str(folder), ui=False)
    service = Service(generator, settings)
    if loads is not None:
        real = service._load_model

        def load(path):
            loads.append(path)
            return real(path)

        service._load_model = load
    return service, weakref.ref(generator)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=float)


def own_image(folder, model) -> np.ndarray:
    """The picture a server started on ``model`` (no switching) makes."""
    service, _ = serve(folder, model)
    with TestClient(create_app(service)) as c:
        r = c.post("/sdapi/v1/txt2img", json=SMALL)
    assert r.status_code == 200, r.text
    return pixels(decode(r.json()["images"][0]))


def test_webuiapi_switches_models_and_each_makes_its_own_pictures(folder):
    alpha, beta = folder / "alpha.safetensors", folder / "sub" / "beta.safetensors"
    loads = []
    service, first = serve(folder, loads=loads)
    with live(create_app(service)) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=2)
        titles = api.util_get_model_names()
        assert titles == [f"alpha [{sha(alpha)[:10]}]", f"beta [{sha(beta)[:10]}]"]  # not the non-checkpoint
        assert api.util_get_current_model() == titles[0]
        made_alpha = api.txt2img(**SMALL)

        api.util_set_model("beta")  # webuiapi: the closest title, posted as sd_model_checkpoint
        assert loads == [str(beta)]
        options = api.get_options()
        assert options["sd_model_checkpoint"] == titles[1] == api.util_get_current_model()
        assert options["sd_checkpoint_hash"] == sha(beta)
        gc.collect()
        assert first() is None  # the old model was let go
        made_beta = api.txt2img(**SMALL)
        fields = parse_infotext(made_beta.info["infotexts"][0])[2]
        assert fields["Model"] == "beta" and fields["Model hash"] == sha(beta)[:10]
        assert made_beta.info["sd_model_name"] == "beta"
        assert fields == parse_infotext(made_beta.image.info["parameters"])[2]  # the PNG's own text

        assert api.set_options({"sd_model_checkpoint": titles[1]}) is None and loads == [str(beta)]  # the same: no load
        api.util_set_model(titles[0])
        again = api.txt2img(**SMALL)
        assert "Model: alpha," in again.info["infotexts"][0]
    assert np.array_equal(pixels(made_alpha.image), pixels(again.image))
    assert np.abs(pixels(made_alpha.image) - pixels(made_beta.image)).mean() > 1  # other weights, other picture
    assert np.array_equal(pixels(made_beta.image), own_image(folder, "sub/beta.safetensors"))
    assert np.array_equal(pixels(made_alpha.image), own_image(folder, "alpha.safetensors"))


def test_plain_http_by_name_or_hash_unknown_names_and_refresh(folder, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(folder, models)
    loads = []
    service, _ = serve(models, loads=loads)
    with TestClient(create_app(service)) as c:
        beta_sha = sha(models / "sub" / "beta.safetensors")
        for value in (beta_sha[:10], "alpha", beta_sha.upper(), "alpha.safetensors"):  # short hash, name, ...
            r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": value})
            assert r.status_code == 200 and r.json() is None, r.text
        assert [p.rsplit("/", 1)[-1] for p in loads] == ["beta.safetensors", "alpha.safetensors",
                                                          "beta.safetensors", "alpha.safetensors"]
        for value in ("gamma", "notes", "../alpha", ""):
            r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": value})
            assert r.status_code == 422 and r.json()["field"] == "sd_model_checkpoint", r.text
            assert str(models) not in r.json()["error"]
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("alpha [")
        assert len(loads) == 4

        shutil.copy(models / "sub" / "beta.safetensors", models / "gamma.safetensors")  # a new file: listed once read
        assert "gamma" not in [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()]
        assert c.post("/sdapi/v1/refresh-checkpoints").json() is None
        assert "gamma" in [m["model_name"] for m in c.get("/sdapi/v1/sd-models").json()]
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "gamma"}).status_code == 200
        info = c.post("/sdapi/v1/txt2img", json=SMALL).json()["info"]
        assert '"sd_model_name": "gamma"' in info


def test_without_a_models_folder_only_the_loaded_model_is_offered(folder):
    generator = Generator.load(str(folder / "alpha.safetensors"), "cpu")
    with TestClient(create_app(Service(generator, ServeSettings(ui=False)))) as c:
        (only,) = c.get("/sdapi/v1/sd-models").json()
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": only["title"]}).status_code == 200
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta"})
        assert r.status_code == 422 and "--models-dir" in r.json()["error"]


def test_a_switch_waits_for_the_running_generation(folder):
    """The switch is a job in the one queue: it waits behind a generation held at its first step, which finishes
    on the model it started with; the requests after the switch use the new model."""
    loads = []
    service, _ = serve(folder, loads=loads)
    reached, go, results = threading.Event(), threading.Event(), {}
    real_submit = service.queue.submit

    def submit(run, *args, **kwargs):  # the next generation waits at its first denoising step
        job = real_submit(run, *args, **kwargs)
        real_step = job.step

        def step(stage, done, total):
            if stage == "denoising" and done == 1:
                reached.set()
                go.wait(30)
            return real_step(stage, done, total)

        job.step = step
        return job

    with TestClient(create_app(service)) as c:
        alpha = c.post("/sdapi/v1/txt2img", json=SMALL).json()["images"][0]
        service.queue.submit = submit
        held = threading.Thread(target=lambda: results.setdefault("held", c.post("/sdapi/v1/txt2img", json=SMALL)))
        held.start()
        assert reached.wait(60)
        service.queue.submit = real_submit
        switch = threading.Thread(target=lambda: results.setdefault(
            "switch", c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta"})))
        switch.start()
        switch.join(1.0)
        assert switch.is_alive() and loads == []  # queued behind the running generation
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("alpha [")
        go.set()
        held.join(60)
        switch.join(60)
        assert results["switch"].status_code == 200 and len(loads) == 1
        assert results["held"].json()["images"][0] == alpha  # made wholly by the model it started on
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("beta [")
        assert c.post("/sdapi/v1/txt2img", json=SMALL).json()["images"][0] != alpha


def test_the_serve_command_switches_with_its_own_device_and_dtype(folder, tmp_path, monkeypatch, capsys):
    """``stylegrad serve --models-dir``: the startup model by name, a switch loaded with the same --device and
    --dtype (and not the startup model's --vae); a missing folder is one line before any model loads."""
    import uvicorn

    from stylegrad.apps.cli import main

    assert main(["serve", "--models-dir", str(tmp_path / "missing"), "--model", "alpha", "--no-ui"]) == 1
    assert "models folder not found" in capsys.readouterr().err

    calls, apps = [], []
    real_load = Generator.load.__func__

    def load(cls, model, device=None, *args, vae=None, **kwargs):  # records the policy; the --vae is not read
        calls.append((model, str(device), kwargs.get("dtype"), vae))
        return real_load(cls, model, device, *args, **kwargs)

    monkeypatch.setattr(Generator, "load", classmethod(load))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setenv("STYLEGRAD_MODELS_DIR", str(folder))
    vae = str(tmp_path / "v.safetensors")
    assert main(["serve", "--model", "alpha", "--device", "cpu", "--dtype", "fp32", "--vae", vae, "--no-ui"]) == 0
    assert calls == [("alpha", "cpu", "fp32", vae)]
    with TestClient(apps[0]) as c:
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("alpha [")
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "beta"}).status_code == 200
        assert calls[1] == (str(folder / "sub" / "beta.safetensors"), "cpu", "fp32", None)
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("beta [")
        assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "alpha"}).status_code == 200
        assert calls[2] == (str(folder / "alpha.safetensors"), "cpu", "fp32", vae)  # the startup model's own VAE


def test_no_batch_crosses_a_switch_and_a_load_out_of_memory_keeps_the_model(folder):
    """With --batch, a generation queued after a switch never joins one queued before it (it would run on the old
    model); a load that runs out of memory is a 422 naming the option, and the loaded model stays."""
    service, _ = serve(folder)
    service = Service(service.generator, ServeSettings(models_dir=str(folder), ui=False, max_batch=4))
    hold, held = threading.Event(), threading.Event()
    with TestClient(create_app(service)) as c:
        blocker = service.queue.submit(lambda job: (held.set(), hold.wait(30)), "block")
        assert held.wait(30)
        out = {}
        threads = [threading.Thread(target=lambda: out.setdefault("before", c.post("/sdapi/v1/txt2img", json=SMALL)))]
        threads[0].start()
        while service.queue.waiting < 1:
            threading.Event().wait(0.01)
        threads.append(threading.Thread(target=lambda: out.setdefault("switch", c.post(
            "/sdapi/v1/options", json={"sd_model_checkpoint": "beta"}))))
        threads[1].start()
        while service.queue.waiting < 2:
            threading.Event().wait(0.01)
        threads.append(threading.Thread(target=lambda: out.setdefault("after", c.post("/sdapi/v1/txt2img", json=SMALL))))
        threads[2].start()
        while service.queue.waiting < 3:
            threading.Event().wait(0.01)
        hold.set()
        for t in threads:
            t.join(60)
        blocker.future.result(30)
        assert out["switch"].status_code == 200, out["switch"].text
        models = [json.loads(out[k].json()["info"])["sd_model_name"] for k in ("before", "after")]
        assert [parse_infotext(json.loads(out[k].json()["info"])["infotexts"][0])[2]["Model"]
                for k in ("before", "after")] == ["alpha", "beta"], models
        assert service.queue.batch_sizes[-2:] == [1, 1]  # the two generations ran apart (the switch between)

        def no_memory(path):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        service._load_model = no_memory
        r = c.post("/sdapi/v1/options", json={"sd_model_checkpoint": "alpha"})
        assert r.status_code == 422 and r.json()["field"] == "sd_model_checkpoint", r.text
        assert "not enough memory" in r.json()["error"]
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("beta [")
        assert c.post("/sdapi/v1/txt2img", json=SMALL).status_code == 200


def test_a_requests_override_runs_it_on_that_model_and_switches_back(folder):
    """A1111's override_settings.sd_model_checkpoint: that request on that model (its own pictures), then the
    server's model again unless override_settings_restore_afterwards is false; an unknown name is a 422."""
    loads = []
    service, _ = serve(folder, loads=loads)
    with TestClient(create_app(service)) as c:
        alpha = c.post("/sdapi/v1/txt2img", json=SMALL).json()["images"][0]
        r = c.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "beta"}})
        assert r.status_code == 200, r.text
        assert "Model: beta," in json.loads(r.json()["info"])["infotexts"][0]
        assert np.array_equal(pixels(decode(r.json()["images"][0])), own_image(folder, "sub/beta.safetensors"))
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("alpha [")  # switched back
        assert c.post("/sdapi/v1/txt2img", json=SMALL).json()["images"][0] == alpha
        assert [p.rsplit("/", 1)[-1] for p in loads] == ["beta.safetensors", "alpha.safetensors"]

        same = c.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "alpha"}})
        assert same.json()["images"][0] == alpha and len(loads) == 2  # the loaded model: nothing to switch

        kept = c.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "beta"},
                                                 "override_settings_restore_afterwards": False})
        assert kept.status_code == 200 and "Model: beta," in json.loads(kept.json()["info"])["infotexts"][0]
        assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("beta [")

        for value in ("gamma", 3):
            r = c.post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": value}})
            assert r.status_code == 422 and r.json()["field"] == "override_settings.sd_model_checkpoint", r.text
        assert len(loads) == 3
