"""``serve``: the web UI and the HTTP APIs (A1111's subset and stylegrad's own) over one loaded model."""

from __future__ import annotations

import os
import sys

from stylegrad.apps.cli.args import add_device, add_model_options


def cmd_serve(a) -> None:
    from stylegrad.apps.serve.settings import ServeSettings, default_dirs
    from stylegrad.checkpoints.library import models_dir
    from stylegrad.pipelines.loading import DEFAULT_MODEL

    settings = ServeSettings(  # a bad address or key fails before any model loads
        host=a.host, port=a.port, api_key=a.api_key or os.environ.get("STYLEGRAD_API_KEY") or None,
        styles_dirs=tuple(a.styles or default_dirs("STYLEGRAD_STYLES_DIR")),
        loras_dirs=tuple(a.loras or default_dirs("STYLEGRAD_LORAS_DIR")),
        embeddings_dirs=tuple(a.embeddings or default_dirs("STYLEGRAD_EMBEDDINGS_DIR")),
        hypernetworks_dirs=tuple(a.hypernetworks or default_dirs("STYLEGRAD_HYPERNETWORKS_DIR")),
        ipadapter_dirs=tuple(a.ip_adapters or default_dirs("STYLEGRAD_IPADAPTER_DIR")),
        clip_vision_dirs=tuple(a.clip_vision_dir or default_dirs("STYLEGRAD_CLIP_VISION_DIR")),
        models_dir=str(folder) if (folder := models_dir(a.models_dir)) else None,  # a missing folder: an error now
        max_waiting=a.queue, max_batch=a.batch, max_side=a.max_side, max_steps=a.max_steps, max_images=a.max_images,
        max_upload_bytes=a.max_upload_mb << 20, log_prompts=a.log_prompts, ui=not a.no_ui, predictor=a.predictor,
        outputs_dir=a.outputs)
    for d in settings.styles_dirs:
        os.makedirs(d, exist_ok=True)
    import importlib.util
    import logging

    needed = ["fastapi", "uvicorn", "multipart"] + (["gradio"] if settings.ui else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        from stylegrad.errors import StylegradError

        raise StylegradError(f"stylegrad serve needs {', '.join(missing)}: pip install 'stylegrad[serve]'")
    import uvicorn

    from stylegrad.apps.serve.app import create_app
    from stylegrad.apps.serve.service import Service
    from stylegrad.pipelines.generation import Generator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    def load(model: str, vae: str | None = None) -> Generator:
        """The startup model, and each one a client switches to: the same --device/--dtype policy and folders."""
        return Generator.load(model, a.device, a.clip_model, a.siglip_model, vae=vae, models_dir=settings.models_dir,
                              embeddings_dirs=list(settings.embeddings_dirs), loras_dirs=list(settings.loras_dirs),
                              dtype=a.dtype, hypernetworks_dirs=list(settings.hypernetworks_dirs))

    first = load(a.model or DEFAULT_MODEL, a.vae)
    loaded = str(first.model)
    # --vae is the startup model's (again when a client switches back to it); another finds its own beside it
    service = Service(first, settings, a.clip_model, a.stylecodes_model,
                      load_model=lambda path: load(path, a.vae if path == loaded else None))
    del first  # the service holds the only reference: a switch frees it
    app = create_app(service)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "") else settings.host
    print(f"stylegrad serving {loaded} on http://{shown}:{settings.port}/ (UI), /sdapi/v1 (A1111), "
          f"/v1 and /docs (stylegrad API){' - API key required' if settings.api_key else ''}", file=sys.stderr)
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="warning")


def register(sub) -> None:
    sub.add_parser("serve", help="web UI and HTTP API (A1111-compatible) over one model",
                   description="Serve one loaded model: a web UI at / (make a style from pictures, generate with "
                   "and without it, stylecodes, PNG info), AUTOMATIC1111's API subset at /sdapi/v1 (txt2img, "
                   "img2img, png-info, progress, interrupt, options, sd-models, samplers, loras, embeddings; the "
                   "aesthetic fields under alwayson_scripts['Aesthetic embeddings'], IP-Adapter as the ControlNet "
                   "extension's units from --ip-adapters; options' sd_model_checkpoint "
                   "switches among --models-dir's checkpoints) and stylegrad's own API at /v1 (its "
                   "OpenAPI page at /docs). Requests queue for the model; a full queue answers 429.",
                   epilog="Example: stylegrad serve --models-dir models/Stable-diffusion --model dreamshaper_8 --styles "
                   "styles/ --loras models/Lora --embeddings embeddings/ (clients switch among the models folder's "
                   "checkpoints with A1111's sd_model_checkpoint option)", arguments=_arguments)


def _arguments(p) -> None:
    from stylegrad.pipelines.limits import SERVER  # the server's limits, defined once
    from stylegrad.pipelines.loading import DEFAULT_MODEL

    g = p.add_argument_group("model")
    add_model_options(g, DEFAULT_MODEL)
    g.add_argument("--clip-model", metavar="ID_OR_PATH", help="CLIP that styles are made with and measured in "
                   "(default: the model family's)")
    g.add_argument("--stylecodes-model", metavar="ID_OR_PATH", help="Stylecodes checkpoint (default: the published)")
    g.add_argument("--siglip-model", metavar="ID_OR_PATH", help="SigLIP image encoder for stylecodes")
    g.add_argument("--predictor", metavar="NAME_OR_FILE", help="aesthetic predictor that scores new styles "
                   "(default: none)")
    add_device(p, dtype=True)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                   "any other needs --api-key)")
    g.add_argument("--port", type=int, default=7860, help="port (default 7860, as A1111)")
    g.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (the web UI asks for it as "
                   "a password); default $STYLEGRAD_API_KEY")
    g.add_argument("--no-ui", action="store_true", help="the APIs only")
    g.add_argument("--log-prompts", action="store_true", help="name prompts in the request log (default: not)")
    g = p.add_argument_group("folders (names in requests resolve only inside these)")
    g.add_argument("--styles", action="append", default=[], metavar="DIR",
                   help="style files; new styles are saved in the first (default: $STYLEGRAD_STYLES_DIR)")
    g.add_argument("--loras", action="append", default=[], metavar="DIR", help="LoRAs (default: $STYLEGRAD_LORAS_DIR)")
    g.add_argument("--outputs", default="outputs", metavar="DIR", help="where A1111 requests with save_images write "
                   "their PNGs, in txt2img-images/ and img2img-images/ as A1111 does (default: outputs)")
    g.add_argument("--embeddings", action="append", default=[], metavar="DIR",
                   help="textual-inversion embeddings (default: $STYLEGRAD_EMBEDDINGS_DIR)")
    g.add_argument("--hypernetworks", action="append", default=[], metavar="DIR",
                   help="A1111 hypernetworks for prompts' <hypernet:NAME:MULT> tags and /sdapi/v1/hypernetworks "
                   "(default: $STYLEGRAD_HYPERNETWORKS_DIR)")
    g.add_argument("--ip-adapters", action="append", default=[], metavar="DIR",
                   help="IP-Adapter files that requests name (ip_adapter, A1111's ControlNet units; default: "
                   "$STYLEGRAD_IPADAPTER_DIR)")
    g.add_argument("--clip-vision-dir", action="append", default=[], metavar="DIR",
                   help="their image encoders (ComfyUI's models/clip_vision; default: $STYLEGRAD_CLIP_VISION_DIR; "
                   "also looked for beside each adapter, then in the Hugging Face cache)")
    g = p.add_argument_group("limits")
    g.add_argument("--queue", type=int, default=16, metavar="N", help="requests waiting behind the running one before "
                   "429 (default 16)")
    g.add_argument("--batch", type=int, default=1, metavar="N", help="run up to N waiting requests with the same "
                   "sampler, steps, guidance and size as one batch: several times the throughput under load, but an "
                   "image then equals `generate`'s only up to float rounding (default 1: exactly the same pixels)")
    g.add_argument("--max-side", type=int, default=SERVER.max_side, metavar="PX",
                   help=f"largest width or height, also of an init image's picture (default {SERVER.max_side})")
    g.add_argument("--max-steps", type=int, default=SERVER.max_steps, metavar="N",
                   help=f"most denoising steps (default {SERVER.max_steps})")
    g.add_argument("--max-images", type=int, default=SERVER.max_images, metavar="N",
                   help=f"most images per request (default {SERVER.max_images})")
    g.add_argument("--max-upload-mb", type=int, default=20, metavar="MB", help="largest uploaded image (default 20)")
    p.set_defaults(func=cmd_serve, parser=p)
