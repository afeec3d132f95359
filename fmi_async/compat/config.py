"""The config of a :class:`fmi_async.compat.Communicator`: FMI's file, and the launcher's part.

FMI's ``config/fmi.json`` (``backends.S3|Redis|Direct`` and ``model``) loads
unchanged (:class:`fmi_async.Config`).  Started by ``fmi run`` (or anything
that sets ``FMI_CONFIG`` the same way), the peer also reads the launcher's
config for what the launcher owns: the address of its rendezvous server for
the file's direct backends (``Direct``/``TCP``, ``UDP``) and the run's
``security.secret``.  Which channels run, and their other options, stay the
file's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..channels import registry
from ..config import Config

__all__ = ["DIRECT_CHANNELS", "load_config"]

logger = logging.getLogger(__name__)

DIRECT_CHANNELS = ("tcp", "udp")
"""Channels that reach peers through the launcher's rendezvous server."""


def load_config(
    source: Config | Mapping[str, Any] | str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """``source`` (FMI's config file path, or a dict, JSON text or Config) with the
    launcher's rendezvous address and secret from ``FMI_CONFIG`` when it is set.

    Raises :class:`~fmi_async.errors.ConfigError` when either does not load.
    """
    env = os.environ if env is None else env
    config = Config.load(source)
    launched = env.get("FMI_CONFIG")
    if not launched:
        return config
    launcher = Config.load(launched)
    for name in config.backends:
        if registry.canonical(name) not in DIRECT_CHANNELS or name not in launcher.backends:
            continue
        given = launcher.backends[name]
        address = {key: given[key] for key in ("host", "port") if key in given}
        if address:
            config = config.with_backend(name, **address)
            logger.debug("backend %s: the launcher's rendezvous server %s", name, address)
    if launcher.secret is not None:
        config = replace(config, secret=launcher.secret)
    return config
