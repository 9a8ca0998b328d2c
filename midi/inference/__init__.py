"""Inference: one RGB image + its instance map -> a 3D scene with one mesh per instance.

Stages, one module each (``inference_with_lora.py`` wires them to the command line): ``scene``
(inputs, torch-free, so bad input fails before the model loads), ``generation`` (pipeline, LoRA,
denoising), ``extraction`` (dense and coarse-to-fine surfaces) and ``export`` (files, preview).
"""
