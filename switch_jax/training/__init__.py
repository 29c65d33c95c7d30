"""Training: the partitioned train step (`train_step`), the loop with its
checkpoints and evaluations (`trainer`), optimizers and schedules
(`optimizers`) and initialization from other checkpoints (`initialization`).
"""
