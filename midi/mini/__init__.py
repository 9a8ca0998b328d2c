"""midi-mini: a small MIDI model trained here on procedural shapes (see models/midi-mini/README.md)."""
