"""The mixture of experts: routers as pure functions (`routing`), the Switch
layer (`switch_layer`), the expert kernels it dispatches to (`dispatch`) and
the plain reference every fast path is tested against (`reference`).
"""
