"""Tuning's memory kept from one prompt for the next (aesthetic/workspace.py): reused only when nothing reads it,
never changing a result, lazily handed back to the kernel in between."""

from pathlib import Path

import pytest
import torch
from test_tuning import PROMPT, ids_of
from tiny import PROJ

from stylegrad import AestheticEncoder, Style, StyleOptions
from stylegrad.aesthetic.adam import AdamSettings
from stylegrad.aesthetic.tuning import personalize
from stylegrad.aesthetic.workspace import WORKSPACE, Workspace

pytestmark = pytest.mark.skipif(not Workspace.enabled(torch.device("cpu")),
                                reason="memory is reused between prompts on Linux only (MADV_FREE)")


@pytest.fixture()
def style():
    return Style(torch.randn(PROJ, generator=torch.Generator().manual_seed(5)))


def _smaps_field(address: int, field: str) -> int:
    """``field`` (kB) of this process's mapping that holds ``address``."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == field + ":":
            return int(line.split()[1])
    return 0


def _scribble_on_kept_regions() -> int:
    """Fill the kept regions with 0xff bytes (NaN as floats): what a reused block holds must never matter."""
    regions = list(WORKSPACE._free.values())
    for region in regions:
        region.tensor().fill_(255)
    return len(regions)


def test_the_next_prompt_reuses_the_memory_and_gets_the_same_numbers(pipe, clip_text, style, monkeypatch):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0)
    options = StyleOptions(steps=4, lr=3e-3)
    monkeypatch.setenv("STYLEGRAD_REUSE_MEMORY", "0")
    WORKSPACE.clear()
    fresh, _ = enc.encode(PROMPT, style, options)
    assert not WORKSPACE._free  # off: every prompt maps its own memory and unmaps it

    monkeypatch.setenv("STYLEGRAD_REUSE_MEMORY", "1")
    enc.encode("another prompt first", style, options)
    assert set(WORKSPACE._free) == {"copies", "moments"}  # kept for the next prompt
    assert _scribble_on_kept_regions() == 2
    reused = WORKSPACE.reused
    again, _ = enc.encode(PROMPT, style, options)
    assert WORKSPACE.reused == reused + 2  # both blocks came from the last prompt
    assert torch.equal(again, fresh)  # whatever the memory held before
    assert set(WORKSPACE._free) == {"copies", "moments"}


def test_kept_memory_is_lazily_freed_between_prompts():
    """Between prompts the kept pages are the kernel's to take back (MADV_FREE), without swapping anything."""
    space = Workspace()
    block = space.lease("moments", 16 << 20, torch.device("cpu"))
    t = block.empty((4 << 20,), torch.float32).fill_(2.0)
    address = t.data_ptr()
    assert _smaps_field(address, "LazyFree") == 0
    del t
    space.give_back(block, "moments")
    assert _smaps_field(address, "LazyFree") > 0
    space.clear()


def test_memory_still_read_is_not_handed_out_again():
    cpu = torch.device("cpu")
    space = Workspace()
    block = space.lease("copies", 8 << 20, cpu)
    held = block.empty((2 << 20,), torch.float32).fill_(1.5)  # a tensor the caller kept
    space.give_back(block, "copies")
    assert not space._free  # not kept: it is still read
    other = space.lease("copies", 8 << 20, cpu)
    scratch = other.empty((2 << 20,), torch.float32).fill_(-7.0)
    assert space.reused == 0 and bool((held == 1.5).all())  # a region of its own
    del scratch
    space.give_back(other, "copies")  # nothing reads this one any more
    assert "copies" in space._free and space.lease("copies", 4 << 20, cpu) is not None and space.reused == 1
    space.clear()


def test_weights_kept_for_the_caller_survive_the_next_prompt(pipe, clip_text, style):
    enc = AestheticEncoder.from_pipeline(pipe, clip_text, cache_size=0)
    adam = AdamSettings.for_device(torch.device("cpu"), 3e-3)
    target = style.vector / style.vector.norm()
    WORKSPACE.clear()
    kept = personalize(enc.tower, ids_of(pipe, PROMPT), target, steps=3, adam=adam, keep_weights=True)
    weights = {name: t.clone() for name, t in kept.weights.items()}
    _scribble_on_kept_regions()
    enc.encode("a different prompt", style, StyleOptions(steps=3))
    _scribble_on_kept_regions()
    assert all(torch.equal(kept.weights[name], t) for name, t in weights.items())
