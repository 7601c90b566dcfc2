"""How the components are reached: the Ray cluster, the in-process backend, the wire format and the local network rules."""
