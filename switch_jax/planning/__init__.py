"""Planning a run before it starts: memory, communication and FLOPs of a
config on a mesh, from the config alone (`analytic`) and from the compiled
step (`compiled`), which the tests hold the analytic figures to; and the
step compiled by the TPU compiler for a named TPU slice on a machine with
no TPU (`tpu` for slices and chips, `tpu_compile` for the step).
"""
