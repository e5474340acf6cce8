"""Audio-visual speech recognition data in the auto_avsr / LRS3 layout (see docs/data.md)."""
