"""The A1111 endpoints clients read when they connect (Open WebUI's connection check reads ``sd_model_checkpoint``
from ``/sdapi/v1/options``, ``webuiapi`` its current model), answered in A1111's shapes with what this server has:
its model (or the models folder's), its hypernetworks, no VAEs, upscalers or face restorers to choose, the
aesthetic-gradients extension as the one script. Of the options, CLIP_stop_at_last_layers can be set, and
sd_model_checkpoint switches among the models folder's checkpoints."""

from __future__ import annotations

import sys
from typing import Any

from starlette.concurrency import run_in_threadpool

from stylegrad.errors import RequestError

from .a1111 import SCRIPT, SCRIPT_ARGS, SCRIPT_DEFAULTS, clip_stop, model_item
from .jobs import wait
from .responses import CmdFlags, OptionsAnswer, SchedulerItem, ScriptInfo, ScriptNames
from .settings import is_loopback

# what A1111 answers a setting or a refresh with: JSON null
NULL_ANSWER = {200: {"description": "done (JSON null, as A1111 answers)",
                     "content": {"application/json": {"schema": {"type": "null"}}}}}
# the extension's ui(): each argument's label and range, as A1111's script-info gives them
SCRIPT_UI = {"aesthetic_weight": ("Aesthetic weight", 0, 1, 0.01), "aesthetic_steps": ("Aesthetic steps", 0, 50, 1),
             "aesthetic_lr": ("Aesthetic learning rate", None, None, None),
             "aesthetic_slerp": ("Slerp interpolation", None, None, None),
             "aesthetic_imgs": ("Aesthetic imgs embedding", None, None, None),
             "aesthetic_imgs_text": ("Aesthetic text for imgs", None, None, None),
             "aesthetic_slerp_angle": ("Slerp angle", 0, 1, 0.01),
             "aesthetic_text_negative": ("Is negative text", None, None, None)}


def script_args(styles: list[str]) -> list[dict]:
    """The extension's arguments as A1111's script-info describes them, in its ui() order."""
    out = []
    for name in SCRIPT_ARGS:
        label, lo, hi, step = SCRIPT_UI[name]
        out.append({"label": label, "value": SCRIPT_DEFAULTS[name], "minimum": lo, "maximum": hi, "step": step,
                    "choices": ["None", *styles] if name == "aesthetic_imgs" else None})
    return out


def _memory() -> dict:
    """A1111's memory answer: RAM from psutil where it is installed, CUDA from torch where it runs."""
    ram: dict = {"error": "unavailable"}
    try:
        import psutil

        vm = psutil.virtual_memory()
        ram = {"free": vm.available, "used": vm.total - vm.available, "total": vm.total}
    except ImportError:
        pass
    cuda: dict = {"error": "unavailable"}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        cuda = {"system": {"free": free, "used": total - free, "total": total}}
    return {"ram": ram, "cuda": cuda}


def routes(app, service) -> None:
    s = service.settings
    tags = ["A1111"]

    @app.get("/sdapi/v1/options", tags=tags, response_model=OptionsAnswer)
    def options():
        """The settings this server runs with, under A1111's names (a request's override_settings change them for
        that request)."""
        item = model_item(service)
        return {"sd_model_checkpoint": item["title"], "sd_checkpoint_hash": item["sha256"],
                "sd_vae": "Automatic", "samples_format": "png", **service.a1111_options}

    @app.post("/sdapi/v1/options", tags=tags, responses=NULL_ANSWER)
    async def set_options(body: dict[str, Any]):
        """Sets CLIP_stop_at_last_layers for every A1111 request after, and sd_model_checkpoint (a title, name or
        hash /sdapi/v1/sd-models lists) switches the model: after the requests queued before, never under a
        running one; the answer comes once the new model is loaded. Any other option is accepted only at the
        value it has here."""
        current = await run_in_threadpool(options)
        for key, value in body.items():
            if key == "CLIP_stop_at_last_layers":
                clip_stop(value, key)
            elif key == "sd_model_checkpoint":
                if not isinstance(value, str) or not value.strip():
                    raise RequestError(key, "{field}: a model's title, name or hash, as /sdapi/v1/sd-models lists "
                                       f"them (got {value!r})")
            elif current.get(key, object()) != value:
                raise RequestError(key, f"{{field}} cannot be set on this server (it is {current.get(key)!r})")
        switch = None
        if "sd_model_checkpoint" in body:  # the name is found (the folder read, hashed once) off the event loop
            switch = await run_in_threadpool(service.submit_model, body["sd_model_checkpoint"])
        if "CLIP_stop_at_last_layers" in body:
            service.a1111_options["CLIP_stop_at_last_layers"] = body["CLIP_stop_at_last_layers"]
        if switch is not None:
            await wait(switch)
        return None

    @app.get("/sdapi/v1/cmd-flags", tags=tags, response_model=CmdFlags)
    def cmd_flags():
        return {"api": True, "nowebui": not s.ui, "listen": not is_loopback(s.host), "port": s.port,
                "api_auth": None, "api_log": False}

    @app.get("/sdapi/v1/hypernetworks", tags=tags, response_model=list[dict[str, Any]])
    def hypernetworks():
        """The hypernetwork folders' files as A1111 lists them: name (the file's stem, what <hypernet:NAME:MULT>
        names) and path."""
        return [{"name": name, "path": str(path)}
                for name, path in sorted(service.hypernetworks().items(), key=lambda kv: kv[0].lower())]

    for path in ("sd-vae", "face-restorers", "prompt-styles", "upscalers", "latent-upscale-modes"):
        app.add_api_route(f"/sdapi/v1/{path}", lambda: [], methods=["GET"], tags=tags, name=path.replace("-", "_"),
                          response_model=list[dict[str, Any]], summary=f"{path}: none on this server")

    @app.get("/sdapi/v1/schedulers", tags=tags, response_model=list[SchedulerItem])
    def schedulers():
        """The schedules a request's 'scheduler' chooses: the sampler's own, or Karras sigmas."""
        return [{"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                 "need_inner_model": False},
                {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False}]

    @app.get("/sdapi/v1/scripts", tags=tags, response_model=ScriptNames)
    def scripts():
        """The aesthetic-gradients extension; and ControlNet's IP-Adapter units where there is an IP-Adapter
        folder."""
        names = [SCRIPT, *(["controlnet"] if s.ipadapter_dirs else [])]
        return {"txt2img": names, "img2img": names}

    @app.get("/sdapi/v1/script-info", tags=tags, response_model=list[ScriptInfo])
    def script_info():
        args = script_args(sorted(service.styles()))
        return [{"name": SCRIPT, "is_alwayson": True, "is_img2img": img2img, "args": args} for img2img in (False, True)]

    @app.get("/sdapi/v1/memory", tags=tags, response_model=dict[str, dict[str, Any]])
    def memory():
        return _memory()

    @app.post("/sdapi/v1/refresh-checkpoints", tags=tags, responses=NULL_ANSWER)
    def refresh_checkpoints():
        """Reads the models folder again (sd-models lists it as it was last read)."""
        service.checkpoints.refresh()
        return None

    for path in ("refresh-loras", "refresh-vae"):
        app.add_api_route(f"/sdapi/v1/{path}", lambda: None, methods=["POST"], tags=tags, responses=NULL_ANSWER,
                          name=path.replace("-", "_"),
                          summary=f"{path}: the lists are read from the folders on every request")

    @app.post("/sdapi/v1/interrogate", tags=tags)
    def interrogate():
        raise RequestError("model", "{field}: this server has no captioning model to interrogate with")
