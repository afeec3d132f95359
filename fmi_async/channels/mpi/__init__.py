"""The MPI channel (``backends.MPI``): the ranks of an mpi4py communicator.

:mod:`~fmi_async.channels.mpi.channel` moves messages, :mod:`.progress`
drives MPI from the event loop, :mod:`.ordered` posts collectives in the
same order on every rank.  Importing this package does not import mpi4py
(so does not initialize MPI); opening the channel does.
"""

from .channel import MPIChannel, MPIOptions, import_mpi

__all__ = ["MPIChannel", "MPIOptions", "import_mpi"]
