"""Training the cheap personalization methods, to measure them beside aesthetic gradients: one data loader
(data.py), one noise/loss step (step.py), one precision policy (precision.py), one checkpoint helper
(checkpoint.py), one loop (loop.py); each method's own part is one small module named after its paper."""
