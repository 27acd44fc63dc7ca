"""The `imageswarm` command line."""
