"""IP-Adapter (Ye et al. 2023, arXiv 2308.06721) and InstantStyle (Wang et al. 2024, arXiv 2404.02733): a
reference picture's CLIP image embedding fed to the UNet's cross-attention beside the prompt, for one call.

One idea per module: ``blocks`` (InstantStyle's block choice, no torch), ``files`` (an adapter file read as data:
its variant, family and image space from tensor shapes), ``library`` (names in the ipadapter folders),
``encoder`` (the CLIP vision tower found beside the file, in clip_vision, or on the hub; diffusers'
preprocessing), ``embeds`` (pictures -> image embeddings, averaged, cached by file hash and encoder),
``styles`` (a style file as the image side, where its space is the adapter's), ``apply`` (diffusers' processors
and projection installed on the UNet for one call and removed after), ``run`` (what a request asks, put
together for the Runner). Only ``blocks`` and ``library`` are importable without torch."""
