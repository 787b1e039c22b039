"""stylegrad as a Cog model (Replicate, or any host that runs Cog containers): ``predictor.py`` is the predictor
``cog.yaml`` points at, its inputs a superset of the published "stable-diffusion-aesthetic-gradients" model's.

One prediction: Cog's inputs (``inputs.py``) -> one ``GenerationRequest`` through ``pipelines.request.build`` ->
the deployment's ``Generator`` (``models.py``: loaded once in ``setup()``) -> PNGs with their infotext, plus the
style file when one was made from the user's pictures (``run.py``). ``schema.py`` writes the OpenAPI schema Cog
validates inputs against. Importing this package imports neither cog nor torch."""
