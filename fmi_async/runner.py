"""``fmi.run(main)``: the entry point of a script started by ``fmi run`` or a handler.

The launcher (``fmi run -n N script.py``) sets, for every peer:

``FMI_PEER_ID``, ``FMI_NUM_PEERS``, ``FMI_COMM_NAME``, ``FMI_RUN_ID`` and
``FMI_CONFIG`` (a JSON document or a path).  A function handler may set the
same variables itself.  Run without them, the script is a job of one peer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from .communicator import Communicator
from .config import Config
from .errors import ConfigError
from .local import local_peers

__all__ = ["run", "communicator_from_env", "launched_by_mpi"]

T = TypeVar("T")


# Variables MPI launchers set in every rank (MPICH/Hydra and Intel MPI, Open MPI,
# PMIx, Slurm's srun): their presence is what makes a script try mpi4py.
MPI_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def launched_by_mpi(env: Mapping[str, str]) -> bool:
    """Whether an MPI launcher (``mpiexec``, ``srun`` with PMI) started this process."""
    if any(name in env for name in MPI_LAUNCHER_VARIABLES):
        return True
    return "SLURM_PROCID" in env and "SLURM_NTASKS" in env and env["SLURM_NTASKS"] != "1"


def communicator_from_env(env: Mapping[str, str] | None = None) -> Communicator | None:
    """The communicator the launcher describes, or ``None`` outside a launched job.

    ``fmi run`` describes it with ``FMI_*`` variables.  Under an MPI launcher
    (or with an ``MPI`` backend in ``FMI_CONFIG``) it is built on mpi4py's
    ``COMM_WORLD`` (:meth:`Communicator.from_mpi`) when that has more than one
    rank, or when the config asks for MPI.
    """
    env = os.environ if env is None else env
    if "FMI_PEER_ID" not in env:
        return _from_mpi(env)
    try:
        peer_id = int(env["FMI_PEER_ID"])
        num_peers = int(env["FMI_NUM_PEERS"])
    except (KeyError, ValueError) as exc:
        raise ConfigError(
            "FMI_PEER_ID and FMI_NUM_PEERS must both be set to integers "
            f"(got FMI_PEER_ID={env.get('FMI_PEER_ID')!r}, "
            f"FMI_NUM_PEERS={env.get('FMI_NUM_PEERS')!r})"
        ) from exc
    return Communicator(
        peer_id,
        num_peers,
        config=env.get("FMI_CONFIG") or None,
        comm_name=env.get("FMI_COMM_NAME", "FMI_WORLD"),
        run_id=env.get("FMI_RUN_ID"),
    )


def _from_mpi(env: Mapping[str, str]) -> Communicator | None:
    config = Config.load(env.get("FMI_CONFIG") or None)
    wants_mpi = "mpi" in config.backends
    if not wants_mpi and not launched_by_mpi(env):
        return None
    try:
        from mpi4py import MPI
    except ImportError:
        if wants_mpi:
            raise ConfigError(
                "the config enables the MPI backend but mpi4py is not installed: "
                "pip install 'fmi-async[mpi]'"
            ) from None
        return None  # an MPI launcher, but no mpi4py: one peer on its own
    if MPI.COMM_WORLD.Get_size() == 1 and not wants_mpi:
        return None
    return Communicator.from_mpi(
        MPI.COMM_WORLD,
        config=config,
        comm_name=env.get("FMI_COMM_NAME", "FMI_WORLD"),
        run_id=env.get("FMI_RUN_ID"),
    )


async def _main(main: Callable[[Communicator], Awaitable[T]]) -> T:
    comm = communicator_from_env()
    if comm is None:
        async with local_peers(1) as (single,):
            return await main(single)
    async with comm:
        return await main(comm)


def run(main: Callable[[Communicator], Awaitable[T]], *, use_uvloop: bool | None = None) -> T:
    """Build the communicator from the environment and run ``main(comm)`` to completion.

    Runs on uvloop when it is installed (``use_uvloop=False`` opts out).
    """
    if use_uvloop is not False:
        try:
            import uvloop
        except ImportError:
            if use_uvloop:
                raise ConfigError("use_uvloop=True but uvloop is not installed") from None
        else:
            result: Any = uvloop.run(_main(main))
            return result  # type: ignore[no-any-return]
    return asyncio.run(_main(main))
