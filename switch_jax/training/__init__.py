"""Training: the partitioned train step (`train_step`), the loop with its
checkpoints and evaluations (`trainer`) and its settings (`train_config`),
optimizers and schedules (`optimizers`) and warm starts from other
checkpoints: fine-tune, upcycle, distill (`warm_start`).
"""
