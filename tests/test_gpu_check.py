"""bench/gpu_check.py is the script run on a lent GPU: here it runs on the tiny configs on the CPU, so it cannot
rot between loans, and its half-precision rows are held to what the CPU gives."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(["--size", "tiny", "--device", "cpu", "--families", "sd1,sdxl"])


def test_every_path_runs_in_both_half_precisions(summary):
    seen = {(r["family"], r["path"], r["dtype"]) for r in summary["rows"]}
    for dtype in ("fp16", "bf16"):
        for path in ("plain", "styled", "lora", "loha", "ti", "stylecode", "styled-conditioning", "train-lora"):
            assert ("sd1", path, dtype) in seen
        for path in ("plain", "styled", "lora", "loha", "styled-conditioning"):
            assert ("sdxl", path, dtype) in seen
        assert ("clip-l", "embed", dtype) in seen and ("clip-l", "score", dtype) in seen
    assert summary["non_finite"] == []


def test_half_precision_stays_near_float32(summary):
    """On the CPU fp16 images stay within two pixel levels of fp32 and bf16 within 16 (its 8-bit mantissa);
    conditioning within 1e-2 (fp16) and 5e-2 (bf16). And each path's fp16 error is under a fifth of what the path
    changes in fp32 (its effect): a LoRA, style, word or code dropped or mangled in fp16 would move it by about
    its whole effect."""
    for r in summary["rows"]:
        if r["dtype"] == "fp16" and r.get("effect") is not None:
            error = r["image_max_diff"] if r["image_max_diff"] is not None else r["embeds_max_diff"]
            assert error * 5 <= r["effect"], r
        image_limit, embeds_limit = (2 / 255, 1e-2) if r["dtype"] == "fp16" else (16 / 255, 5e-2)
        if r.get("image_max_diff") is not None:
            assert r["image_max_diff"] <= image_limit, r
        for key in ("embeds_max_diff", "pooled_max_diff"):
            if r.get(key) is not None:
                assert r[key] <= embeds_limit, r


def test_timings_and_ratios_are_reported(summary):
    for family in ("sd1", "sdxl"):
        for key in ("styled_s", "plain_s", "reference_s", "lora_apply_remove_s"):
            assert summary[f"{family}_{key}"] > 0
        assert math.isfinite(summary[f"{family}_styled_vs_reference"])
