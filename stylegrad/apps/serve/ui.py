"""The web UI (Gradio, this field's convention), mounted at / in the same app as the APIs, over the same
``Service``: every button queues a job like an API request does, and shows that job's progress."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from stylegrad.errors import RequestError, StylegradError
from stylegrad.pipelines.grids import label_grid

NO_STYLE = "(none)"
# the schema's field -> the page's label for it, so an error names what the user sees
LABELS = {"prompt": "Prompt", "negative": "Negative prompt", "style": "Style", "style_options.steps": "Style steps",
          "style_options.lr": "Style learning rate", "style_options.weight": "Style weight", "stylecode": "Stylecode",
          "loras": "LoRAs", "seed": "Seed", "steps": "Steps", "cfg": "CFG scale", "width": "Width", "height": "Height",
          "sampler": "Sampler", "ip_adapter": "IP-Adapter", "ip_images": "Reference pictures",
          "ip_scale": "IP-Adapter scale", "ip_style": "Style only (InstantStyle)"}


def _wait(job, progress):
    """The job's result, the Gradio progress bar following its steps meanwhile."""
    while not job.future.done():
        snap = job.snapshot()
        progress(snap["progress"], desc=f"{snap['stage']} {snap['step']}/{snap['steps']}" if snap["steps"] else
                 snap["stage"])
        time.sleep(0.1)
    return job.future.result()


def _png_file(image, text: str) -> str:
    """The image as a PNG file carrying its parameters (what the gallery serves, so a download keeps them)."""
    from stylegrad.files.pnginfo import save_png

    folder = Path(tempfile.gettempdir()) / "stylegrad-ui"
    folder.mkdir(exist_ok=True)
    fd, name = tempfile.mkstemp(suffix=".png", dir=folder)
    os.close(fd)
    return str(save_png(image, name, text))


def _fail(e: Exception):
    import gradio as gr

    if isinstance(e, RequestError):
        e = e.renamed(LABELS.get(e.field.split("[")[0], e.field))
    raise gr.Error(str(e)) from e


def _number(value):
    """A widget's number as the schema wants it: a whole float (sliders give 20.0) as an int; anything else as
    it is, for the schema to refuse with the field's name."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _actions(service) -> SimpleNamespace:
    """What each button does: every one queues a job on the service and follows its progress."""
    import gradio as gr

    s = service.settings
    samplers = [a for _, a in service.samplers()]
    width_default = height_default = service.default_size()

    def style_choices():
        return [NO_STYLE] + sorted(service.styles())

    def ip_adapter_choices():
        return [NO_STYLE] + sorted(service.ip_adapters())

    def pictures(files) -> list:
        """The reference pictures dropped on the page, each checked as an API upload is."""
        from .images import open_image

        if len(files or []) > s.max_ip_images:
            raise RequestError("ip_images", f"at most {s.max_ip_images} pictures, got {len(files)}")
        return [open_image(Path(f if isinstance(f, str) else f.name).read_bytes(), s.max_upload_bytes,
                           Path(str(f)).name, s.max_image_pixels) for f in files or []]

    def make_style(files, name, progress=gr.Progress()):
        try:
            if not files:
                raise StylegradError("add some pictures first")
            from .images import open_image

            raws = []
            for f in files:
                raw = Path(f if isinstance(f, str) else f.name).read_bytes()
                open_image(raw, s.max_upload_bytes, Path(str(f)).name, s.max_image_pixels)
                raws.append(raw)
            style, saved, score = _wait(service.submit_style(raws, name or "style"), progress)
        except Exception as e:  # noqa: BLE001 - shown in the page
            _fail(e)
        if saved is None:
            out = Path(tempfile.mkdtemp(prefix="stylegrad-ui-")) / f"{style.name}.safetensors"
            from stylegrad.files.styles import save_style

            saved = save_style(style, out)
        score_text = f", aesthetic score {score:.2f}" if score is not None else ""
        summary = (f"**{saved.stem}**: a style from {len(raws)} images (width {style.width}{score_text}). "
                   + ("Saved on the server: pick it in *Generate*." if s.styles_dirs else ""))
        return str(saved), summary, gr.update(choices=style_choices(), value=saved.stem)

    def generate(prompt, negative, style, style_steps, style_lr, style_weight, stylecode, code_image, loras,
                 lora_weight, seed, width, height, steps, cfg, sampler, compare, ip_adapter=NO_STYLE, ip_files=None,
                 ip_scale=1.0, ip_style=False, progress=gr.Progress()):
        from dataclasses import replace

        from .controlnet import placeholders

        try:
            chosen = ip_adapter if ip_adapter and ip_adapter != NO_STYLE else None
            ip_images = pictures(ip_files)
            ip = dict(ip_adapter=chosen, ip_images=placeholders(len(ip_images)), ip_scale=ip_scale,
                      ip_style=bool(ip_style)) if chosen or ip_images else {}
            request = service.request(dict(
                prompt=prompt or "", negative=negative or "", seed=_number(seed), steps=_number(steps),
                cfg=cfg, width=_number(width), height=_number(height), sampler=sampler or None,
                style=style if style and style != NO_STYLE else None,
                style_options={"steps": _number(style_steps), "lr": style_lr, "weight": style_weight},
                loras=[f"{x}:{lora_weight}" for x in (loras or [])], stylecode=(stylecode or "").strip() or None,
                **ip), random_seed_allowed=True)
            code_img = code_image if code_image is not None and not request.stylecode else None
            styled = _wait(service.submit_generation(request, 1, stylecode_image=code_img, ip_images=ip_images),
                           progress)
            image, text = styled[0]
            with_style = request.styled or request.ip_adapter is not None
            shown = [(_png_file(image, text), "with style" if with_style else "result")]
            grid = None
            if compare and with_style:  # the same seed without the style and the reference pictures
                plain_request = replace(request, style=None, ip_adapter=None, ip_images=(), ip_style=False,
                                        ip_blocks=None, ip_scale=1.0)
                plain, plain_text = _wait(service.submit_generation(plain_request, 1, stylecode_image=code_img),
                                          progress)[0]
                shown.insert(0, (_png_file(plain, plain_text), "without style"))
                label = (f"with style ({request.style_options.steps} steps)" if request.styled else "with style")
                if request.ip_adapter is not None:
                    label += f" + IP-Adapter {request.ip_scale:g}"
                grid = label_grid([[plain, image]], ["without style", label], [f"seed {request.seed}"])
        except Exception as e:  # noqa: BLE001 - shown in the page
            _fail(e)
        return shown, grid, text

    def code_of(image, progress=gr.Progress()):
        if image is None:
            raise gr.Error("drop an image first")
        try:
            return _wait(service.submit_code(image.convert("RGB")), progress)
        except Exception as e:  # noqa: BLE001
            _fail(e)

    def code_preview(code, prompt, seed, progress=gr.Progress()):
        try:
            request = service.request(dict(prompt=prompt or "a house by a lake", seed=_number(seed), steps=20,
                                           stylecode=(code or "").strip(), width=width_default,
                                           height=height_default), random_seed_allowed=True)
            ((image, text),) = _wait(service.submit_generation(request, 1), progress)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        return _png_file(image, text)

    def png_info(file):
        if file is None:
            return "", {}
        try:
            from .images import open_image

            raw = Path(file if isinstance(file, str) else file.name).read_bytes()
            open_image(raw, s.max_upload_bytes, "image", s.max_image_pixels)
            text, _, fields = service.png_info(raw)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        return text or "(no generation parameters in this image)", fields

    def send_to_generate(fields):
        p = (fields or {}).get("parameters", {})

        def num(key, default):
            try:
                return type(default)(p.get(key, default))
            except (TypeError, ValueError):
                return default

        size = str(p.get("Size", "")).split("x")
        w, h = (int(size[0]), int(size[1])) if len(size) == 2 and all(x.isdigit() for x in size) else (None, None)
        return (gr.update(value=(fields or {}).get("prompt", "")), gr.update(value=(fields or {}).get("negative", "")),
                gr.update(value=num("Seed", 0)), gr.update(value=num("Steps", 20)),
                gr.update(value=num("CFG scale", 7.0)), gr.update(value=w) if w else gr.update(),
                gr.update(value=h) if h else gr.update(),
                gr.update(value=p["Sampler"]) if p.get("Sampler") in samplers else gr.update(),
                gr.update(selected="generate"))

    def evaluate(prompts, style, steps, seeds, progress=gr.Progress()):
        try:
            lines = [x.strip() for x in (prompts or "").splitlines() if x.strip()]
            step_list = [int(x) for x in str(steps).replace(",", " ").split()]
            if not style or style == NO_STYLE:
                raise StylegradError("pick a style to evaluate")
            out = Path(tempfile.mkdtemp(prefix="stylegrad-eval-"))
            base = service.request(dict(prompt="", style_options={"steps": 0}, width=int(width_default),
                                        height=int(height_default), steps=20))
            summary = _wait(service.submit_evaluation(lines, style, step_list, int(seeds), base, out), progress)
        except Exception as e:  # noqa: BLE001
            _fail(e)
        rows = ["| style | steps | aesthetic | CLIP score | style similarity |", "|---|---|---|---|---|"]
        for name, by_steps in summary.items():
            for k, m in sorted(by_steps.items(), key=lambda kv: int(kv[0])):
                rows.append(f"| {name} | {k} | {m['aesthetic']['mean']:.3f} | {m['clip_score']['mean']:.2f} | "
                            f"{m['style_similarity']['mean']:.3f} |")
        return "\n".join(rows), str(out / "report.html")

    return SimpleNamespace(style_choices=style_choices, ip_adapter_choices=ip_adapter_choices,
                           make_style=make_style, generate=generate, code_of=code_of,
                           code_preview=code_preview, png_info=png_info, send_to_generate=send_to_generate,
                           evaluate=evaluate)


def build_ui(service):
    """The page: five tabs over the same service as the APIs."""
    import gradio as gr

    s = service.settings
    samplers = [a for _, a in service.samplers()]
    act = _actions(service)
    style_choices = act.style_choices
    width_default = height_default = service.default_size()
    with gr.Blocks(title="stylegrad") as ui:
        gr.Markdown(f"## stylegrad · {service.model_name}\nStyles from a handful of pictures (aesthetic gradients), "
                    "stylecodes, and the same API as A1111 at `/sdapi/v1` (stylegrad's own: `/docs`).")
        with gr.Tabs() as tabs:
            with gr.Tab("Style", id="style"):
                files = gr.File(label="Pictures in your style", file_count="multiple", file_types=["image"],
                                elem_id="style-files")
                name = gr.Textbox(label="Name", value="my-style", elem_id="style-name")
                make = gr.Button("Make style", variant="primary", elem_id="make-style")
                style_file = gr.File(label="Style file", interactive=False, elem_id="style-file")
                style_summary = gr.Markdown(elem_id="style-summary")
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                        negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                        style = gr.Dropdown(style_choices(), value=NO_STYLE, label="Style", elem_id="style")
                        with gr.Row():
                            style_steps = gr.Slider(0, s.max_style_steps, value=10, step=1, label="Style steps")
                            style_lr = gr.Number(value=1e-4, label="Style learning rate")
                            style_weight = gr.Slider(0, 1, value=1.0, step=0.05, label="Style weight")
                        compare = gr.Checkbox(value=True, label="Also without the style (comparison)",
                                              elem_id="compare")
                        with gr.Accordion("Reference pictures (IP-Adapter)", open=bool(service.ip_adapters()),
                                          elem_id="ip-adapter-box"):
                            ip_files = gr.File(label="Reference pictures (several: averaged)", file_count="multiple",
                                               file_types=["image"], elem_id="ip-images")
                            with gr.Row():
                                ip_adapter = gr.Dropdown(act.ip_adapter_choices(), value=NO_STYLE, label="IP-Adapter",
                                                         elem_id="ip-adapter")
                                ip_scale = gr.Slider(0, 2, value=0.6, step=0.05, label="IP-Adapter scale",
                                                     elem_id="ip-scale")
                            ip_style = gr.Checkbox(value=False, label="Style only (InstantStyle: the pictures act on "
                                                   "the style blocks, not the layout)", elem_id="ip-style")
                        with gr.Accordion("Stylecode, LoRAs", open=False):
                            stylecode = gr.Textbox(label="Stylecode")
                            code_image = gr.Image(label="...or the style of this image", type="pil")
                            loras = gr.Dropdown(sorted(service.loras()), multiselect=True, label="LoRAs")
                            lora_weight = gr.Slider(0, 2, value=1.0, step=0.05, label="LoRA weight")
                            gr.Markdown("Embeddings: " + (", ".join(sorted(service.embeddings())) or "none") +
                                        " (write their names in the prompt)")
                        with gr.Row():
                            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
                            steps = gr.Slider(1, s.max_steps, value=20, step=1, label="Steps", elem_id="steps")
                            cfg = gr.Slider(0, 30, value=7.0, step=0.5, label="CFG scale")
                        with gr.Row():
                            width = gr.Slider(8, s.max_side, value=width_default, step=8, label="Width")
                            height = gr.Slider(8, s.max_side, value=height_default, step=8, label="Height")
                            sampler = gr.Dropdown(samplers, value=service.default_sampler()
                                                  if service.default_sampler() in samplers else None, label="Sampler")
                        go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                    with gr.Column():
                        gallery = gr.Gallery(label="Images", columns=2, elem_id="gallery")
                        grid = gr.Image(label="Comparison", type="pil", visible=True, elem_id="grid")
                        info = gr.Textbox(label="Parameters", lines=4, elem_id="infotext")
            with gr.Tab("Codes", id="codes"):
                with gr.Row():
                    with gr.Column():
                        code_in = gr.Image(label="Image", type="pil")
                        code_btn = gr.Button("Make code")
                    with gr.Column():
                        code_out = gr.Textbox(label="Stylecode (paste it into Generate, or preview it)",
                                              elem_id="code")
                        preview_prompt = gr.Textbox(value="a house by a lake", label="Preview prompt")
                        preview_seed = gr.Number(value=0, precision=0, label="Seed")
                        preview_btn = gr.Button("Preview")
                        preview = gr.Image(label="Preview", type="filepath")
            with gr.Tab("PNG info", id="pnginfo"):
                png = gr.File(label="A generated PNG", file_types=[".png", ".jpg", ".jpeg", ".webp"], elem_id="png")
                png_text = gr.Textbox(label="Parameters", lines=6, elem_id="png-text")
                png_fields = gr.JSON(label="Fields")
                send = gr.Button("Send to Generate", elem_id="send-to-generate")
            with gr.Tab("Evaluate", id="evaluate"):
                prompts = gr.Textbox(label="Prompts, one per line", lines=4)
                eval_style = gr.Dropdown(style_choices(), label="Style")
                eval_steps = gr.Textbox(value="0 5 10", label="Style steps to compare")
                eval_seeds = gr.Number(value=1, precision=0, label="Seeds per prompt")
                eval_btn = gr.Button("Evaluate")
                eval_table = gr.Markdown()
                eval_report = gr.File(label="Report (HTML)")
        make.click(act.make_style, [files, name], [style_file, style_summary, style])
        go.click(act.generate, [prompt, negative, style, style_steps, style_lr, style_weight, stylecode, code_image, loras,
                            lora_weight, seed, width, height, steps, cfg, sampler, compare, ip_adapter, ip_files,
                            ip_scale, ip_style], [gallery, grid, info])
        code_btn.click(act.code_of, [code_in], [code_out])
        preview_btn.click(act.code_preview, [code_out, preview_prompt, preview_seed], [preview])
        png.change(act.png_info, [png], [png_text, png_fields])
        send.click(act.send_to_generate, [png_fields], [prompt, negative, seed, steps, cfg, width, height, sampler, tabs])
        eval_btn.click(act.evaluate, [prompts, eval_style, eval_steps, eval_seeds], [eval_table, eval_report])
    return ui


def mount_ui(app, service):
    import gradio as gr
    from PIL import Image

    # the page's image inputs are decoded by Gradio, before our checks: PIL's own bomb check (an error at twice
    # this many pixels, read from the header) is lowered to the server's limit, never raised
    limit = service.settings.max_image_pixels
    Image.MAX_IMAGE_PIXELS = min(Image.MAX_IMAGE_PIXELS or limit, limit)
    return gr.mount_gradio_app(app, build_ui(service), path="/")
