"""Planning a run before it starts: memory, communication and FLOPs of a
config on a mesh, from the config alone (`analytic`) and from the compiled
step (`compiled`), which the tests hold the analytic figures to.
"""
