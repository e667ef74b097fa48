"""The library behind the command line: each verb does one operator's command
and returns data (dataclasses, plain dicts and lists) for ``output`` to print.
Edge: verbs read the host and change it, always through the lower modules.

- ``lifecycle``: start, stop, restart, destroy, pause, under the host lock.
- ``inspect``: ``ls``, ``inspect`` and ``network ls/inspect`` documents.
- ``stats``: usage samples from a machine's control group and veth.
- ``logs``: a machine's output, and ``--since`` windows.
- ``events``: pymachine's event log merged with the supervisor's own.
- ``disk``: ``df``, ``image ls``, ``image rm`` and ``prune``.
- ``enter``: a command run in a running machine (exec, shell, logs --journal).
- ``boot``: install and uninstall of the boot apply's units.
"""

from pymachined.verbs.lifecycle import (
    LOCK,
    Verbs,
    host_lock,
    known,
    needed_by,
    prepare,
)

__all__ = ["LOCK", "Verbs", "host_lock", "known", "needed_by", "prepare"]
