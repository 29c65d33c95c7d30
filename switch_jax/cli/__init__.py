"""The `switch-jax` command (`main`) and its subcommands (`commands/`), the gin
glue (`gin_config`, `resources`), pod and local launch (`launch`), plots and
the quickstart job.
"""
