"""The long-running imageswarm service: swarm, control plane, REST API and CLI."""
