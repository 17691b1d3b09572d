"""Checkpoints on disk: the Hub's tensor names and the shapes a config implies (:mod:`.names`), reading
safetensors without loading them (:mod:`.reader`), and writing them (:mod:`.writer`)."""
