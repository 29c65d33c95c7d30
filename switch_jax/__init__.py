"""switch-jax: Switch Transformers (sparse mixture-of-experts T5) in JAX/Flax."""

__version__ = "0.1.0"
