"""The lab's errors (a branch of imageswarm.agent.errors; the CLI prints them as one line).

LabError             raised when the lab cannot be built, entered or found: not root, a tool
                     missing, a command failing, a lab already up, a host that does not exist.
"""

from __future__ import annotations

from imageswarm.agent.errors import ImageSwarmError


class LabError(ImageSwarmError):
    pass
