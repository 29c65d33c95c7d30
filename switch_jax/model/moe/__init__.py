"""The mixture of experts: routers as pure functions (`routing`), the Switch
layer (`switch_layer`), its data path and kernel registry (`dispatch`), the
expert kernels (`kernels`, and `cpu_kernels` for the XLA:CPU-only one) and
the plain reference every fast path is tested against (`reference`).
"""
