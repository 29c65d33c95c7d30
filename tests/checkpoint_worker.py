"""One process of a two-process run of `TrainCheckpointer` (no model).

Usage: python checkpoint_worker.py PROCESS_ID PORT MODEL_DIR save|restore OUT_JSON
`save` writes steps 2 and 4 of a state whose arrays are split over both
processes' devices; `restore` restores the newest intact step and writes
(process 0) its step and the sum of its parameters to OUT_JSON.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import small_train_state  # noqa: E402  (tests/ is on sys.path: the script's own folder)
from switch_jax.checkpoints import train_state  # noqa: E402
from switch_jax.config import ModelConfig  # noqa: E402


def state_at(step: int, mesh) -> dict:
  """Parameters whose value depends on the step, split over every device."""
  sharding = NamedSharding(mesh, P("x"))
  values = np.arange(8 * 16, dtype=np.float32).reshape(8, 16) * step
  w = jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])
  counter = jax.make_array_from_callback((), NamedSharding(mesh, P()),
                                         lambda index: np.asarray(step, np.int32))
  return small_train_state.State(step=counter, params={"w": w}, opt_state={"m": w})


def main():
  process_id, port, model_dir, phase, out = sys.argv[1:6]
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                             process_id=int(process_id))
  mesh = jax.make_mesh((jax.device_count(),), ("x",))
  checkpointer = train_state.TrainCheckpointer(model_dir, keep=3, async_save=True)
  if phase == "save":
    for step in (2, 4):
      checkpointer.save(step, state_at(step, mesh), ModelConfig(), {"batches": step})
    checkpointer.close()
  else:
    abstract = train_state.abstract_like(
        jax.eval_shape(lambda: state_at(0, mesh)),
        jax.tree.map(lambda x: x.sharding, state_at(0, mesh)))
    step, state, _, _ = checkpointer.restore_latest(abstract)
    checkpointer.close()
    total = float(jax.jit(lambda w: jnp.sum(w), out_shardings=NamedSharding(mesh, P()))(
        state.params["w"]))
    if int(process_id) == 0:
      with open(out, "w") as f:
        json.dump({"step": int(step), "sum": total}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
