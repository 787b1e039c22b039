"""What the main endpoints answer, as models: FastAPI checks each answer against its model and writes the models
into ``/openapi.json``, so a client generated from it reads the real shapes. The A1111 ones follow A1111's own
(``modules/api/models.py``); each allows more fields where A1111's may carry more."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Open(BaseModel):
    """An answer that may carry fields beyond those named (A1111's do, across versions)."""

    model_config = ConfigDict(extra="allow")


# -- A1111 ---------------------------------------------------------------------------------------------------
class ImageAnswer(Open):
    """txt2img and img2img: base64 PNGs (each with its infotext in the 'parameters' text chunk)."""

    images: list[str] = Field(description="base64 PNGs; empty when send_images is false")
    parameters: dict[str, Any] = Field(description="the request as the server read it")
    info: str = Field(description="JSON text: seeds, infotexts and the other generation fields")


class ProgressState(Open):
    skipped: bool
    interrupted: bool
    stopping_generation: bool = False
    job: str = Field(description="the running job's id, '' when idle")
    job_count: int
    job_timestamp: str
    job_no: int
    sampling_step: int
    sampling_steps: int


class ProgressAnswer(Open):
    progress: float = Field(description="0 to 1")
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class OptionsAnswer(Open):
    """The settings this server runs with, under A1111's names."""

    sd_model_checkpoint: str = Field(description="the loaded model's title, as /sdapi/v1/sd-models lists it")
    sd_checkpoint_hash: str | None = Field(description="its file's sha256 (null for a folder or a hub id)")
    CLIP_stop_at_last_layers: int = Field(ge=1, le=12)


class ModelItem(Open):
    title: str
    model_name: str
    hash: str | None = Field(description="A1111's short hash: the first 10 hex digits of sha256")
    sha256: str | None
    filename: str
    config: str | None = None


class SamplerItem(Open):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class LoraItem(Open):
    name: str
    alias: str
    path: str
    metadata: dict[str, Any]


class EmbeddingItem(Open):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int = Field(description="the width of its vectors")
    vectors: int


class EmbeddingsAnswer(Open):
    loaded: dict[str, EmbeddingItem] = Field(description="those that fit the loaded model, by name")
    skipped: dict[str, EmbeddingItem] = Field(description="those that do not (another model family's)")


class PNGInfoAnswer(Open):
    info: str = Field(description="the infotext, '' when the image has none")
    items: dict[str, Any] = Field(description="the image's other text chunks")
    parameters: dict[str, Any] = Field(description="the infotext's fields as A1111 parses them")


class CmdFlags(Open):
    api: bool
    nowebui: bool
    listen: bool
    port: int


class SchedulerItem(Open):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float
    need_inner_model: bool


class ScriptNames(Open):
    txt2img: list[str]
    img2img: list[str]


class ScriptArg(Open):
    label: str
    value: Any = None
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: list[str] | None = None


class ScriptInfo(Open):
    name: str
    is_alwayson: bool
    is_img2img: bool
    args: list[ScriptArg]


# -- stylegrad's own ---------------------------------------------------------------------------------------------
class GenerateAnswer(BaseModel):
    task_id: str
    images: list[str] = Field(description="base64 PNGs, each with its infotext")
    infotexts: list[str]
    seeds: list[int]


class JobProgress(BaseModel):
    id: str
    kind: str
    stage: str
    progress: float = Field(description="0 to 1")
    step: int
    steps: int
    eta_seconds: float
    cancelled: bool
    interrupted: bool


class CancelAnswer(BaseModel):
    cancelled: str


class StyleList(BaseModel):
    styles: list[str]


class StyleMade(BaseModel):
    name: str = Field(description="its name in the styles folder, where requests can use it")
    saved: bool
    images: int
    width: int = Field(description="the width of its image embedding (the CLIP it was made with)")
    sdxl: bool
    aesthetic_score: float | None = Field(description="by the server's --predictor; null without one")
    file: str = Field(description="the style file (safetensors), base64")


class CodeAnswer(BaseModel):
    """An image's stylecode; or, for a code, a preview made with it (then preview and infotext are given)."""

    code: str
    preview: str | None = Field(None, description="base64 PNG")
    infotext: str | None = None


class ServerInfo(BaseModel):
    model: str
    family: str | None
    styles: list[str]
    loras: list[str]
    embeddings: list[str]
    ip_adapters: list[str] = Field(default_factory=list, description="IP-Adapters a request's ip_adapter may name")
    samplers: list[str]
    default_sampler: str
    limits: dict[str, int | None] = Field(description="this server's limits on a request and on uploads")
