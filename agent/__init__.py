"""Node-local image handling: formats, chunk store, verification and (later) the in-place swap.

Nothing here imports imageswarm.daemon: the agent must run on a node without the daemon.
"""
