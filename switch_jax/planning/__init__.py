"""Planning a run before it starts: memory, communication and FLOPs of a
config on a mesh, analytically and from the compiled step (`analytic`).
"""
