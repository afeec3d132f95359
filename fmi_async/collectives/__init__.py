"""Collective algorithms: coroutines over a :class:`~.base.CollectiveContext`.

The algorithm modules are imported here so that their registrations in
:mod:`fmi_async.collectives.registry` are complete before anyone reads it.
"""

from . import direct, mediated, native, pipelined

__all__ = ["direct", "mediated", "native", "pipelined"]
