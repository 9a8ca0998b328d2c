"""LoRA training of MIDI-3D: the objective, batches, feature cache, run building, checkpoints and
export, validation and metrics. ``train_lora.py`` holds the loop."""
