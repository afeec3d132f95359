"""Which channels a job under ``fmi run`` uses: a disabled TCP backend stays
disabled, and a config's ``collective_channel`` pins every collective."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from fmi_async.config import Config
from fmi_async.errors import ConfigError
from fmi_async.tools.cli import main
from fmi_async.tools.launcher import merge_config

PEER = """
import asyncio

import fmi_async as fmi
import numpy as np

async def main(comm):
    total = await comm.allreduce(np.full(4, comm.rank + 1.0))
    await comm.barrier()
    other = (comm.rank + 1) % comm.size
    _, got = await asyncio.gather(
        comm.send(comm.rank, other), comm.recv((comm.rank - 1) % comm.size)
    )
    stats = comm.stats()
    used = sorted(name for name, c in stats["channels"].items() if c["messages_sent"])
    plans = sorted({key.split("/")[1] for key in stats["collectives"]})
    print("result", total.tolist(), got == other, "opened", sorted(stats["channels"]), "used", used,
          "collectives on", plans)

fmi.run(main)
"""


def _run(tmp_path: Path, config: dict[str, object], capsys: pytest.CaptureFixture[str]) -> str:
    peer = tmp_path / "peer.py"
    peer.write_text(textwrap.dedent(PEER))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    argv = ["run", "-n", "2", "--nat", "none", "--timeout", "60", "--config", str(path)]
    assert main([*argv, str(peer)]) == 0
    lines = {line.partition("] ")[2] for line in capsys.readouterr().out.splitlines()}
    assert len(lines) == 1, lines  # both peers saw the same
    return lines.pop()


def _redis(redis_server: tuple[str, int]) -> dict[str, object]:
    host, port = redis_server
    return {"enabled": True, "host": host, "port": port, "ttl": 600}


def test_disabled_tcp_stays_disabled(
    tmp_path: Path, redis_server: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"backends": {"TCP": {"enabled": False}, "Redis": _redis(redis_server)}}
    line = _run(tmp_path, config, capsys)
    assert line == (
        "result [3.0, 3.0, 3.0, 3.0] True opened ['redis'] used ['redis'] collectives on ['redis']"
    )


def test_collective_channel_pins_collectives_not_point_to_point(
    tmp_path: Path, redis_server: tuple[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"backends": {"Redis": _redis(redis_server)}, "collective_channel": "Redis"}
    line = _run(tmp_path, config, capsys)
    # TCP is filled in by the launcher and carries send/recv; every collective
    # (the allreduce and the barrier) runs on Redis.
    assert line == (
        "result [3.0, 3.0, 3.0, 3.0] True opened ['redis', 'tcp'] used ['redis', 'tcp'] "
        "collectives on ['redis']"
    )


def test_collective_channel_must_be_enabled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {"collective_channel": "redis"}
    peer = tmp_path / "peer.py"
    peer.write_text(textwrap.dedent(PEER))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["run", "-n", "1", "--nat", "none", "--config", str(path), str(peer)]) != 0
    assert "collective_channel 'redis' but it is not enabled" in capsys.readouterr().err


def test_merge_config_keeps_a_disabled_tcp_backend() -> None:
    merged = merge_config({"backends": {"Direct": {"enabled": False}}}, "127.0.0.1", 5, "s")
    assert merged["backends"] == {"Direct": {"enabled": False, "host": "127.0.0.1", "port": 5}}
    assert Config.from_dict({**merged, "backends": {"Redis": {}, **merged["backends"]}}).enabled()
    with pytest.raises(ConfigError, match="unknown backend 'nonsense'"):
        Config.from_dict({"collective_channel": "nonsense"})
