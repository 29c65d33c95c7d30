"""Evaluating and using a trained model, one job per module:
`decoding` (greedy and beam search), `restore` (a checkpoint's params on a
mesh), `teacher_forced` (validation loss and accuracy), `inference`
(decoding inputs; `switch-jax infer` to JSON lines) and `evaluator`
(`switch-jax eval`: both kinds of metrics, seqio's task metrics on decoded
outputs).
"""
