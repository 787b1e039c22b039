"""The exactness contract's tolerances, in one place (docs/exactness.md states the tiers and why each holds).

Bit-equal tier (no tolerance: ``torch.equal``): 0 steps or no style and ``encode_prompt``; on the compiled kernels,
every memory mode (kept, rebuilt, a budget between) with each other; memory kept between prompts or fresh; the
kernels' products on any number of threads; ``kernels=False`` and an install without the kernels.

Float-rounding tier: the engine (``tuning.personalize``, any ``EngineSettings``) against the method
(``method.tune_text_encoder``), as the largest absolute difference of the conditioning states and the pooled
embedding."""

# the tests' small towers (SD1.x, SD2.x and SDXL layouts): measured 8e-7 to 2.1e-6 on every path (float32
# moments, or AVX-512's 24-bit rounded ones); moments packed tighter (5 bytes) reached 1.95e-5 and were refused
REFERENCE_ATOL = 1e-5

# full-size towers (CLIP ViT-L's 12 x 768, bigG's 32 x 1280, bench/personalize.py): more terms per sum and more
# layers for rounding to grow through; measured 3.7e-6 to 6.4e-6 (SD1.x) and 7.6e-5 to 7.9e-5 (SDXL, pooled too)
FULL_SIZE_ATOL = 1e-4
