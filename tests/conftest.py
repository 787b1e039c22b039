import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import CLIPTextModelWithProjection  # noqa: E402
from transformers.utils import logging as tlog  # noqa: E402

tlog.set_verbosity_error()
torch.set_num_threads(min(2, os.cpu_count() or 1))

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared() -> Path:
    """Real data from ../shared; CI (STYLEGRAD_REQUIRE_SHARED=1, set by .ci/run) fails instead of skipping."""
    if not SHARED.is_dir():
        if os.environ.get("STYLEGRAD_REQUIRE_SHARED") == "1":
            pytest.fail(f"{SHARED} is missing but CI requires it")
        pytest.skip(f"real-data fixtures not found at {SHARED} (they sit beside the repo in CI only)")
    return SHARED


def needs_kernels():
    """stylegrad's compiled kernels, or a skip where they were not built; CI on x86-64
    (STYLEGRAD_REQUIRE_KERNELS=1, set by .ci/run) fails instead of skipping."""
    from stylegrad.aesthetic import products

    if products._KERNELS is None:
        if os.environ.get("STYLEGRAD_REQUIRE_KERNELS") == "1":
            pytest.fail("the compiled kernels were not built or do not load (setup.py builds them; .ci/run needs them)")
        pytest.skip("stylegrad's compiled kernels are not built for this platform; torch's products are used")
    return products._KERNELS


def kernels_on(isa: str):
    """Generator for a fixture: the compiled kernels switched to instruction set ``isa`` for one test, then back;
    a skip where this CPU lacks it."""
    kernels = needs_kernels()
    before = kernels.isa()
    try:
        kernels.use(isa)
    except ValueError:
        pytest.skip(f"this CPU has no {isa}")
    yield isa
    kernels.use(before)


@pytest.fixture()
def tiny_predictor(tmp_path):
    """An aesthetic predictor (a linear probe) on the tiny CLIP's space."""
    from tiny import PROJ

    path = tmp_path / "tiny_predictor.pth"
    g = torch.Generator().manual_seed(4)
    torch.save({"linear.weight": torch.randn(1, PROJ, generator=g), "linear.bias": torch.tensor([5.0])}, path)
    return path


@pytest.fixture(scope="session")
def clip():
    from tiny import tiny_clip

    return tiny_clip(0)


def text_with_projection(clip) -> CLIPTextModelWithProjection:
    model = CLIPTextModelWithProjection(clip.config.text_config).eval()
    model.text_model.load_state_dict(clip.text_model.state_dict())
    model.text_projection.load_state_dict(clip.text_projection.state_dict())
    return model


@pytest.fixture(scope="session")
def clip_text(clip):
    return text_with_projection(clip)


@pytest.fixture()
def pipe(clip):
    from tiny import tiny_pipeline

    return tiny_pipeline(clip)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny CLIP and SD pipeline saved as folders, as a user's local models would be."""
    from tiny import save_world

    return save_world(tmp_path_factory.mktemp("world"))


@pytest.fixture()
def tiny_checkpoint_configs(tmp_path_factory, monkeypatch):
    """The loader reads the tiny models' configs (tests/checkpoint_configs, with the tiny tokenizer), and a
    cache of its own."""
    from ckpt_layout import configs_folder

    folder = tmp_path_factory.getbasetemp() / "configs"
    if not folder.exists():
        configs_folder(folder)
    monkeypatch.setenv("STYLEGRAD_CHECKPOINT_CONFIGS", str(folder / "checkpoint_configs"))
    monkeypatch.setenv("STYLEGRAD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.delenv("STYLEGRAD_MODELS_DIR", raising=False)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Four of the small world's example pictures in a folder of their own: a training set."""
    import shutil

    examples = Path(__file__).resolve().parents[1] / "stylegrad" / "world" / "examples"
    folder = tmp_path_factory.mktemp("pictures")
    for p in sorted(examples.glob("*.png"))[:4]:
        shutil.copy(p, folder / p.name)
    return folder
