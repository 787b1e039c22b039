"""Tuning memory on a card, without one: the budget reads free memory on CUDA and MPS (their calls stood in for) and
is never blind on an accelerator; running out of memory falls back to rebuilt moments once, with one note and a low
run's result; rebuilt moments run off the CPU (on the ``meta`` device, CUDA's one-device rule enforced), holding
only the copies and a few scratch tiles there, the gradient factors' history in host memory; and the allocation
tracker of bench/tuning_memory.py shows the bytes a matrix weight costs in each mode on a bigG-shaped tower."""

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from conftest import needs_kernels
from test_lora_devices import OneDevice
from test_tuning import PROMPT
from tiny import PROJ

from stylegrad import AestheticEncoder, Style, StylegradError, StyleOptions
from stylegrad.aesthetic import eos_forward, memory, products
from stylegrad.aesthetic.engine import EngineSettings
from stylegrad.errors import describe
from stylegrad.notes import StylegradNote

BENCH = Path(__file__).resolve().parents[1] / "bench" / "tuning_memory.py"


def _bench():
    spec = importlib.util.spec_from_file_location("tuning_memory_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.fixture(autouse=True)
def fresh_memory_state(monkeypatch):
    """Notes given and towers that ran out are per process: each test starts with none."""
    monkeypatch.setattr(memory, "_noted", set())
    monkeypatch.setattr(memory, "_ran_out", set())


@pytest.fixture()
def style():
    return Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(3)))


WEIGHTS = {f"w{i}": torch.empty(1000, 1000) for i in range(4)}  # 4 MB copies; kept on an accelerator: 48 MB


# -- the budget reads the accelerator's free memory ----------------------------------------------------------------

def test_cuda_and_mps_budgets_read_free_memory(monkeypatch):
    """CUDA: the driver's free memory plus what torch's allocator caches unused. MPS: Metal's recommended working
    set less what torch's tensors take. Each decides what auto keeps."""
    cuda, mps = torch.device("cuda:0"), torch.device("mps")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30 << 20, 12 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 40 << 20)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 << 20)
    assert memory.free_bytes(cuda) == 60 << 20
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 16 << 30, raising=False)
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: (16 << 30) - (48 << 20), raising=False)
    assert memory.free_bytes(mps) == 48 << 20
    # 3/4 of 60 MB = 45 MB: the 16 MB of copies and 3 of the 4 pairs of moments (8 MB each)
    with pytest.warns(StylegradNote, match="75% of the weights"):
        assert list(memory.choose_moments("auto", WEIGHTS, cuda).values()) == ["kept"] * 3 + ["rebuilt"]
    # 3/4 of 48 MB = 36 MB: two pairs
    with pytest.warns(StylegradNote, match="50% of the weights"):
        assert list(memory.choose_moments("auto", WEIGHTS, mps).values()) == ["kept"] * 2 + ["rebuilt"] * 2
    monkeypatch.setattr(torch.mps, "current_allocated_memory", lambda: 0, raising=False)
    assert set(memory.choose_moments("auto", WEIGHTS, mps).values()) == {"kept"}  # 16 GB free: all of them


def test_auto_is_never_blind_on_an_accelerator(monkeypatch):
    """Where an accelerator's free memory cannot be read (a torch without MPS's memory calls), auto rebuilds every
    moment, with one note; on the CPU an unknown amount still keeps them (it swaps, it does not fail)."""
    monkeypatch.delattr(torch.mps, "recommended_max_memory", raising=False)
    assert memory.free_bytes(torch.device("mps")) is None
    with pytest.warns(StylegradNote, match="cannot be read"):
        assert set(memory.choose_moments("auto", WEIGHTS, torch.device("mps")).values()) == {"rebuilt"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert set(memory.choose_moments("auto", WEIGHTS, torch.device("mps")).values()) == {"rebuilt"}
        assert set(memory.choose_moments("fast", WEIGHTS, torch.device("mps")).values()) == {"kept"}  # asked for
    monkeypatch.setattr(memory, "free_bytes", lambda device: None)
    assert set(memory.choose_moments("auto", WEIGHTS, torch.device("cpu")).values()) == {"kept"}


# -- out of memory: one fall-back to rebuilt moments ---------------------------------------------------------------

OUT_OF_MEMORY = {
    "cuda": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 MiB"),
    "mps": lambda: RuntimeError("MPS backend out of memory (MPS allocated: 9.1 GB, other allocations: 1 GB)"),
}


def _on(path: str, monkeypatch) -> None:
    """The compiled kernels (where built) or torch's path: each makes kept moments its own way."""
    if path == "torch":
        monkeypatch.setattr(products, "_KERNELS", None)
    else:
        needs_kernels()  # a skip in a user's clone without them; CI, where they must build, fails instead


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(("error", "path"), [("cuda", "kernels"), ("mps", "torch")])
def test_out_of_memory_falls_back_to_rebuilt_moments_once(pipe, clip_text, style, error, path, monkeypatch):
    """The first kept moments run out of memory: the prompt is tuned again from scratch with rebuilt moments, and
    its result is a low run's to the bit, with exactly one note; the pipeline is untouched, the callback hears
    each step once, and the next prompt rebuilds at once (no second failure, no second note)."""
    _on(path, monkeypatch)
    options = StyleOptions(steps=4, lr=3e-3)
    low = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0, engine=EngineSettings(memory="low"))
    expected = low.encode(PROMPT, style, options)[0]
    before = _state(pipe.text_encoder)
    real, calls = eos_forward.AdamMatrix._new_moments, []

    def new_moments(self):
        calls.append(self.name)
        if len(calls) == 1:
            raise OUT_OF_MEMORY[error]()
        return real(self)

    monkeypatch.setattr(eos_forward.AdamMatrix, "_new_moments", new_moments)
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0, engine=EngineSettings(memory="fast"))
    steps = []
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        got = enc.encode(PROMPT, style, options, callback=lambda step, sim: steps.append(step))[0]
        again = enc.encode("another prompt", style, options)[0]
    assert torch.equal(got, expected)
    assert [str(n.message) for n in notes if n.category is StylegradNote] == [
        next(str(n.message) for n in notes if "ran out of memory" in str(n.message))]
    assert steps == list(range(options.steps))
    assert len(calls) == 1 and again.isfinite().all()  # the next prompt made no kept moments at all
    after = _state(pipe.text_encoder)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_what_counts_as_running_out_of_memory():
    """CUDA's OutOfMemoryError, MPS's and the CPU allocator's RuntimeErrors, Python's MemoryError; nothing else."""
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(1 << 62, dtype=torch.uint8)  # 4 EiB: the CPU allocator's own error
    for error in (*(make() for make in OUT_OF_MEMORY.values()), cpu.value, MemoryError()):
        assert memory.out_of_memory(error), error
    for error in (RuntimeError("Expected all tensors to be on the same device"), ValueError("out of memory")):
        assert not memory.out_of_memory(error)


def test_other_errors_are_not_retried(pipe, clip_text, style, monkeypatch):
    monkeypatch.setattr(eos_forward.AdamMatrix, "_new_moments", lambda self: (_ for _ in ()).throw(
        RuntimeError("Expected all tensors to be on the same device")))
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0, engine=EngineSettings(memory="fast"))
    with pytest.raises(RuntimeError, match="same device"):
        enc.encode(PROMPT, style, StyleOptions(steps=2))
    assert not memory._ran_out


@pytest.mark.parametrize("setting", ["fast", "low"])
def test_out_of_memory_even_rebuilt_is_one_line_with_the_need(pipe, clip_text, style, setting, monkeypatch):
    """When not even the copies fit, one StylegradError line says how much tuning needed on the device."""
    _on("torch", monkeypatch)  # where a copy is made by _take_copy

    def no_room(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")

    monkeypatch.setattr(eos_forward.AdamMatrix, "_take_copy", no_room)
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0, engine=EngineSettings(memory=setting))
    with pytest.raises(StylegradError) as caught, warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        enc.encode(PROMPT, style, StyleOptions(steps=2))
    assert len(notes) == (setting == "fast")  # kept moments: the fall-back's note, then the retry fails too
    line = describe(caught.value)
    assert "\n" not in line and "even rebuilding Adam moments" in line
    assert "needs about 0.0 GB there" in line  # the tiny tower's few kilobytes, rounded


# -- rebuilt moments off the CPU -----------------------------------------------------------------------------------

def _meta_tower(layers: int, hidden: int = 256, sdxl: bool = True):
    """bigG's layout (gelu, its own projection) scaled down, on the meta device in fp16, as a GPU pipeline holds it."""
    cfg = {"class": "CLIPTextModelWithProjection", "hidden_size": hidden, "intermediate_size": 4 * hidden,
           "num_attention_heads": 4, "num_hidden_layers": layers, "max_position_embeddings": 77, "vocab_size": 49408,
           "hidden_act": "gelu", "projection_dim": hidden, "layer_norm_eps": 1e-5, "bos_token_id": 49406,
           "eos_token_id": 49407, "pad_token_id": 0}
    return bench.text_tower(cfg, sdxl=sdxl, device="meta")


def _peaks(tower, setting: str, steps: int, tokens: int = 77):
    with OneDevice():  # CUDA's rule: an op's tensors on one device (0-dim CPU scalars apart)
        tracker, chosen = bench.tune_tracked([tower], memory_setting=setting, tokens=tokens, steps=steps)
    assert set(chosen.values()) == {"kept" if setting == "fast" else "rebuilt"}
    return tracker.peak["meta"], tracker.peak["cpu"]


def test_rebuilt_moments_run_off_the_cpu_with_the_history_on_the_host():
    """On the meta device, where a tensor left on the wrong device raises: tuning runs in both modes; with
    rebuilt moments every step's gradient factors are kept in host memory, which grows with the steps, while the
    device holds only the history of the one matrix stepping (moved over for its step)."""
    tower = _meta_tower(layers=2)
    fast, _ = _peaks(tower, "fast", steps=2)
    low2, host2 = _peaks(tower, "low", steps=2)
    low6, host6 = _peaks(tower, "low", steps=6)
    assert low6 < fast  # the bytes each mode costs a weight: the next test
    first_layer = (4 * (256 + 256) + 2 * (1024 + 256)) * 77 * 4  # bytes of one step's factors (grad_out, x) there
    largest = (1024 + 256) * 77 * 4  # of fc1's (or fc2's) alone
    assert low6 - low2 <= 4 * largest  # four more steps: fc1's four more factors on the device at its step
    assert host6 - host2 >= 4 * first_layer  # and every matrix's in host memory


def test_each_mode_costs_what_docs_state_per_matrix_weight():
    """The tracker's peak on a bigG-shaped tower, per matrix weight added with more layers: kept moments 12 bytes
    (the float32 copy and two float32 moments), rebuilt ones 4 (the copy), plus activations and the small tensors'
    own copies and moments (a little more on this narrow tower than on bigG's, where bench/tuning_memory.py measures
    4.1 and 12.1)."""
    per_layer = 4 * 256 * 256 + 2 * 256 * 1024
    slope = {}
    for setting in ("fast", "low"):
        two, four = (_peaks(_meta_tower(layers), setting, steps=3, tokens=10)[0] for layers in (2, 4))
        slope[setting] = (four - two) / (2 * per_layer)
    assert 12 <= slope["fast"] < 12.5
    assert 4 <= slope["low"] < 4.5
