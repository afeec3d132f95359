"""The channel registry is the one place a channel is declared.

A test-only channel (`LoopChannel` below: in-process queues keyed by
communicator name and run id) is added with one `registry.register(...)` call
and nothing else, and then works everywhere a channel is named: config
parsing, its typed options, the communicator's point-to-point choice and
collectives, the planner's default models.  Every built-in channel is checked
against its entry, and every backend section refuses unknown keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

import fmi_async as fmi
from fmi_async.channels import registry
from fmi_async.channels.base import Channel, ChannelContext, DirectChannel
from fmi_async.channels.mailbox import Mailbox
from fmi_async.channels.options import ChannelOptions, option, option_fields, parse_options
from fmi_async.config import Config
from fmi_async.errors import ClosedError, ConfigError
from fmi_async.selection.model import CostModel, default_models
from fmi_async.selection.plan import plan
from fmi_async.wire import Key, Payload

# ---------------------------------------------------------------- a test-only channel


@dataclasses.dataclass(frozen=True)
class LoopOptions(ChannelOptions):
    """``backends.Loop``: nothing to set but a label."""

    label: str = option("loop", doc="a name for messages")


class LoopChannel(DirectChannel):
    """Peers of one process meet in a class-level table keyed by job."""

    name = "loop"
    Options = LoopOptions
    boxes: ClassVar[dict[tuple[str, str], dict[int, Mailbox]]] = {}

    def __init__(self, ctx: ChannelContext) -> None:
        super().__init__(ctx)
        self.group = LoopChannel.boxes.setdefault((ctx.comm_name, ctx.run_id), {})

    async def open(self) -> None:
        self.group[self.peer_id] = self.mailbox
        await super().open()

    async def close(self) -> None:
        self.group.pop(self.peer_id, None)
        await super().close()

    def send_waits(self, dst: int) -> bool:
        return False

    async def send(self, dst: int, key: Key, payload: Payload) -> None:
        self._check_open()
        box = self.group.get(dst)
        if box is None:
            raise ClosedError(f"peer {dst} is not open on the loop channel")
        box.deliver(self.peer_id, key, payload.copy())
        self.stats.sent(payload)


LOOP = registry.ChannelSpec(
    "loop",
    __name__,
    "LoopChannel",
    "direct",
    "Loop",
    aliases=("looptest",),
    deployable=False,
    model={"overhead": 1e-6, "bandwidth": 1e9, "aggregate_bandwidth": 1e9, "source": "test"},
)


@pytest.fixture
def loop_registered() -> Iterator[None]:
    registry.register(LOOP, before="memory")
    try:
        yield
    finally:
        registry.unregister("loop")
        LoopChannel.boxes.clear()


# ---------------------------------------------------------------- the test-only channel works


async def test_a_registered_channel_runs_collectives(loop_registered: None) -> None:
    config = {"backends": {"LoopTest": {"enabled": True, "label": "x"}}}
    comms = [fmi.Communicator(i, 3, config, "reg", run_id="r1") for i in range(3)]
    try:
        for c in comms:
            await c.open()
        chans = [c._channels for c in comms]
        assert all(list(ch) == ["loop"] for ch in chans)
        assert all(isinstance(ch["loop"], LoopChannel) for ch in chans)
        assert all(ch["loop"].options == LoopOptions(label="x") for ch in chans)
        results = await _gather(c.allreduce(c.rank + 1, fmi.SUM) for c in comms)
        assert results == [6, 6, 6]
        await _gather(c.send(c.rank * 10, (c.rank + 1) % 3, tag=4) for c in comms)
        got = await _gather(c.recv((c.rank - 1) % 3, tag=4) for c in comms)
        assert got == [20, 0, 10]
        sent = [ch["loop"].stats.messages_sent for ch in chans]
        assert min(sent) >= 2 and sum(sent) > 3  # the allreduce and the send went over it
    finally:
        for c in comms:
            await c.close()


async def test_a_registered_channel_is_preferred_in_its_place(loop_registered: None) -> None:
    """Registered before memory, it carries point-to-point when both are enabled."""
    async with fmi.local_peers(2, {"backends": {"Loop": {}}}) as comms:
        assert [n for n in comms[0]._channels] == ["loop", "memory"]
        assert comms[0]._p2p is comms[0]._channels["loop"]
        await _gather(
            comms[0].send("hi", 1, tag=1),
            comms[1].recv(0, tag=1),
        )


def test_a_registered_channel_is_known_to_config_and_planner(loop_registered: None) -> None:
    assert Config.from_dict({"backends": {"LOOPTEST": {}}}).enabled() == ["loop"]
    assert registry.names()[0] == "loop"
    models = default_models()
    assert models["loop"].overhead == 1e-6
    chosen = plan(
        "bcast",
        nbytes=8,
        num_peers=4,
        channels=[("loop", "direct"), ("tcp", "direct")],
        models=CostModel(models),
    )
    assert chosen.channel == "loop"  # a microsecond beats tcp's 340


def test_registering_a_taken_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(dataclasses.replace(LOOP, name="redis"))
    with pytest.raises(ConfigError, match="already registered"):
        registry.register(dataclasses.replace(LOOP, aliases=("direct",)))
    assert "loop" not in registry.names()


# ---------------------------------------------------------------- the built-in channels


@pytest.mark.parametrize("name", registry.names())
def test_every_entry_matches_its_class(name: str) -> None:
    entry = registry.spec(name)
    try:
        cls = entry.load()
    except ConfigError as exc:  # an optional dependency is missing here
        pytest.skip(str(exc))
    assert cls.name == name
    assert cls.kind == entry.kind
    assert registry.resolve(entry.config_name) == name
    assert issubclass(cls.Options, ChannelOptions)
    for alias in entry.aliases:
        assert registry.resolve(alias.upper()) == name
    assert name in default_models()


def test_no_entry_without_an_implementation() -> None:
    """Every name that the package lists (config, planner, models) is a real channel."""
    assert set(default_models()) == set(registry.names())
    for entry in registry.channels():
        module = importlib.import_module(entry.module)  # importing mpi's does not start MPI
        assert issubclass(getattr(module, entry.cls), Channel), entry


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown backend 'Pigeon'.*Direct.*Redis"):
        Config.from_dict({"backends": {"Pigeon": {}}})
    with pytest.raises(ConfigError, match="unknown channel 'fax'"):
        registry.spec("fax")


# ---------------------------------------------------------------- typed options


@pytest.mark.parametrize("name", registry.names())
@pytest.mark.parametrize("typo", ["enabeld", "hots"])
def test_an_unknown_key_names_itself_and_the_known_keys(name: str, typo: str) -> None:
    entry = registry.spec(name)
    try:
        cls = entry.load()
    except ConfigError as exc:
        pytest.skip(str(exc))
    config = Config.from_dict({"backends": {entry.config_name: {typo: 1}}})
    with pytest.raises(ConfigError) as info:
        cls.parse_options(config)
    text = str(info.value)
    assert f"backends.{entry.config_name}" in text and repr(typo) in text
    assert "'enabled'" in text and "'max_timeout'" in text  # the known keys are listed


async def test_an_unknown_key_fails_open_on_every_peer() -> None:
    """Before anything is claimed or connected, alike on every peer."""
    config = {"backends": {"Memory": {"latancy": 0.1}}}
    with pytest.raises(ConfigError, match=r"latancy.*known keys.*latency"):
        async with fmi.local_peers(3, config):
            pass


def test_fmi_common_keys_mean_the_same_everywhere() -> None:
    for entry in registry.channels():
        try:
            cls = entry.load()
        except ConfigError:
            continue
        fields = option_fields(cls.Options)
        for key in ("enabled", "timeout", "max_timeout"):
            assert key in fields, (entry.name, key)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"label": 5}, r"backends\.Loop\.label must be a string"),
        ({"enabled": "yes"}, r"enabled must be true or false"),
        ({"max_timeout": 0}, r"max_timeout must be at least 1"),
        ({"timeout": "fast"}, r"timeout must be a number"),
        ({"timeout": float("nan")}, r"timeout must be a number"),
        ({"max_timeout": float("inf")}, r"max_timeout must be finite"),
    ],
)
def test_values_are_checked_against_their_field(raw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_options(LoopOptions, raw, "Loop")


def test_values_are_typed() -> None:
    parsed = parse_options(LoopOptions, {"timeout": 5, "max_timeout": 100.0}, "Loop")
    assert parsed.timeout == 5.0 and isinstance(parsed.timeout, float)
    assert parsed.max_timeout == 100.0
    assert parsed.label == "loop" and parsed.enabled is True


async def _gather(*aws: Any) -> list[Any]:
    """``asyncio.gather`` of awaitables given one by one or as one iterable."""
    if len(aws) == 1 and not hasattr(aws[0], "__await__"):
        aws = tuple(aws[0])
    return list(await asyncio.gather(*aws))


def test_the_documented_option_tables_match_the_code() -> None:
    """docs/channels.md's tables are generated from the options classes."""
    from pathlib import Path

    from fmi_async.tools.options_doc import options_markdown, replace_block

    doc = Path(__file__).resolve().parents[2] / "docs" / "channels.md"
    text = doc.read_text()
    assert replace_block(text, options_markdown()) == text, (
        "docs/channels.md is stale: run python -m fmi_async.tools.options_doc --write"
    )
    assert "`max_connections`" in text and "`bucket_name`" in text


def test_algorithm_families_per_channel() -> None:
    """MPI's own collectives are offered on the mpi channel only; a channel the table
    does not know (a plugin not registered) gets its kind's families, never mpi's."""
    assert registry.families("mpi", "direct") == ("mpi", "direct")
    assert registry.families("tcp", "direct") == ("direct",)
    assert registry.families("redis", "mediated") == ("direct", "mediated")
    assert registry.families("unregistered", "mediated") == ("direct", "mediated")
    assert registry.families("unregistered", "direct") == ("direct",)
