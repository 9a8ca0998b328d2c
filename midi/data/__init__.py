"""Data tools for MIDI-3D finetuning: preparing, checking and reading "midi-scenes" datasets.

Import the modules themselves (nothing is re-exported here):

- reading (numpy/PIL only): :mod:`midi.data.dataset` (``open_dataset``, ``load_scene_sample``),
  :mod:`midi.data.surface_io`, :mod:`midi.data.images` (the one image/id-map reader),
  :mod:`midi.data.manifest`, :mod:`midi.data.layout` (every on-disk layout);
- writing: :mod:`midi.data.prepare` (``prepare_dataset``, ``prepare_synthetic``),
  :mod:`midi.data.check` (``check_dataset``), :mod:`midi.data.atomic` (the one atomic writer).

See ``prepare_data.py`` for the command line.
"""
