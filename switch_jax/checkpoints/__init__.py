"""Models on disk: the model checkpoint format and the one resolver of every
`--checkpoint` (`model_format`), training checkpoints (`train_state`), and
Hugging Face import/export (`hf`, reading weight files with `weight_files`).
"""
