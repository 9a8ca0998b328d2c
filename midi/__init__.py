"""MIDI-3D / TripoSG LoRA toolkit: models, scheduler, pipeline, adapters, data tools and training.

Nothing is imported here, so that ``import midi.config`` (the CLIs' torch-free config check) and
``import midi.data`` (the data tools) stay cheap. Import from the module paths, which a released
``model_index.json`` names too: ``from midi.pipelines.pipeline_midi import MIDIPipeline``.
"""

__version__ = "0.1.0"
