"""One process of a two-process CPU run (the code path of a multi-host pod).

Usage: python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_JSON
Each process owns JAX_NUM_CPU_DEVICES local devices; together they form one
(data=2, expert=4, model=1) mesh and run two sharded train steps.
"""

import json
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import mesh_case  # noqa: E402  (tests/ is on sys.path: the script's own folder)


def main():
  process_id, num_processes, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes, process_id=process_id)
  losses, checksum = mesh_case.run_train_steps((2, 4, 1), steps=2)
  checksum = float(checksum.addressable_shards[0].data)  # replicated: any shard is it
  if process_id == 0:
    with open(out, "w") as f:
      json.dump({"losses": losses, "checksum": checksum,
                 "devices": jax.device_count(), "processes": jax.process_count()}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
