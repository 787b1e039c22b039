"""The models people have: single-file checkpoints (SD1.x, SD2.x, SDXL) loaded offline, the models folder, and
A1111-style checkpoint merging, all one tensor at a time where it matters."""
