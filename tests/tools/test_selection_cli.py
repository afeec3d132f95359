"""``fmi plan`` and ``fmi cost``: the table names every collective and the plan
plan() chooses; the plot is a PNG; the cost of a real run adds up."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

import fmi_async as fmi
from fmi_async.channels import registry
from fmi_async.config import Config
from fmi_async.errors import ConfigError
from fmi_async.selection.model import CostModel, load_models
from fmi_async.selection.plan import OPERATIONS, Hint, plan
from fmi_async.tools.cli import main
from fmi_async.tools.cost_report import cost_report, load_stats
from fmi_async.tools.plot import FAMILIES
from fmi_async.tools.units import parse_size

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _chosen(op: str, hint: Hint, peers: int, size: int, channels: list[str]) -> str:
    kw: dict[str, object] = {"nbytes": size, "is_array": True, "elements": size // 8}
    if op in ("reduce", "allreduce", "reduce_scatter", "scan", "exscan"):
        kw["operator"] = fmi.SUM
    p = plan(
        op,
        num_peers=peers,
        channels=[(c, registry.spec(c).kind) for c in channels],
        models=CostModel(load_models({})),
        hint=hint,
        **kw,  # type: ignore[arg-type]
    )
    return f"{p.channel} {p.family}:{p.algorithm}"


# ---------------------------------------------------------------- fmi plan


def test_plan_lists_every_collective_and_marks_the_choice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["plan", "--peers", "8", "--size", "1MiB"]) == 0
    out = capsys.readouterr().out
    table, summary = out.split("chosen under FAST:")
    channels = ["tcp", "redis", "s3", "dynamodb"]  # the default without a config
    for op in OPERATIONS:
        rows = [line for line in table.splitlines() if line.startswith(op + " ")]
        assert rows, f"{op} missing from the table"
        fast = [r for r in rows if re.search(r"\bFAST\b", r)]
        cheap = [r for r in rows if re.search(r"\bCHEAP\b", r)]
        assert len(fast) == 1 and len(cheap) == 1, rows
        channel, algorithm = _chosen(op, Hint.FAST, 8, 1 << 20, channels).split()
        assert fast[0].split()[1:3] == [channel, algorithm]
        channel, algorithm = _chosen(op, Hint.CHEAP, 8, 1 << 20, channels).split()
        assert cheap[0].split()[1:3] == [channel, algorithm]
        line = next(s for s in summary.splitlines() if s.startswith(op + " "))
        assert _chosen(op, Hint.FAST, 8, 1 << 20, channels) in line


def test_plan_uses_the_config_channels_and_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fmi.json"
    # A Redis so slow that FAST must prefer S3 for a small bcast.
    path.write_text(
        json.dumps(
            {
                "backends": {"Redis": {"host": "127.0.0.1"}, "S3": {"bucket_name": "b"}},
                "model": {"Redis": {"overhead_s": 10.0}},
            }
        )
    )
    argv = ["--peers", "4", "--size", "8", "--config", str(path), "--collectives", "bcast"]
    assert main(["plan", *argv, "--hint", "fast"]) == 0
    out = capsys.readouterr().out
    assert "channels redis, s3" in out
    fast = next(line for line in out.splitlines() if "FAST" in line and line.startswith("bcast"))
    assert " s3 " in fast
    assert "tcp" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--peers", "0", "--size", "8"], "--peers must be at least 1"),
        (["--peers", "2", "--size", "lots"], "cannot read the size"),
        (["--peers", "2", "--size", "8", "--channels", "fax"], "unknown channel"),
        (["--peers", "2", "--size", "8", "--collectives", "shout"], "unknown collective"),
    ],
)
def test_plan_errors_say_what_to_fix(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plot_is_a_png_with_a_panel_per_family_legends_outside_and_the_size_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is optional; the test extra installs it")
    from matplotlib.figure import Figure

    drawn: list[Figure] = []
    save = Figure.savefig

    def keep(fig: Figure, *args: object, **kwargs: object) -> None:
        drawn.append(fig)
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    out = tmp_path / "plans.png"
    assert main(["plan", "--peers", "8", "--size", "1000", "--plot", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 10_000  # panels with lines, not an empty canvas
    (fig,) = drawn
    axes = fig.get_axes()
    assert len(axes) == 2 * len(FAMILIES)  # time and cost of each family
    assert sorted(op for _, ops in FAMILIES for op in ops) == sorted(OPERATIONS)
    drawn_ops = []
    for ax in axes:
        curves = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
        assert 1 <= len(curves) <= 4  # a few lines per panel, not eleven
        # --size is drawn (a dashed vertical line) and is one of the plotted sizes.
        (marker,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert list(marker.get_xdata()) == [1000, 1000]
        assert all(1000 in list(c.get_xdata()) for c in curves)
        legend = ax.get_legend()
        if legend is not None:  # under the panel, not over the curves
            anchor = legend.get_bbox_to_anchor().transformed(ax.transAxes.inverted())
            assert anchor.y0 < 0
            drawn_ops += [t.get_text() for t in legend.get_texts()]
    assert sorted(drawn_ops) == sorted(OPERATIONS)
    assert len(fig.legends) == 1  # the channels' markers, above the panels


def test_plot_without_matplotlib_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    argv = ["--peers", "4", "--size", "8", "--plot", str(tmp_path / "x.png")]
    assert main(["plan", *argv]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_sizes_parse_binary_and_decimal_units() -> None:
    assert parse_size("8") == 8
    assert parse_size("64KiB") == 65536
    assert parse_size("1 MiB") == 1 << 20
    assert parse_size("1MB") == 10**6


# ---------------------------------------------------------------- fmi cost


async def test_cost_of_a_real_run_sums_per_peer_and_in_total(
    redis_config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with fmi.local_peers(4, config=redis_config, timeout=30) as comms:
        x = np.arange(1000, dtype=np.float64)
        sums = await _run(comms, x)
        assert all(np.array_equal(s, x * 4) for s in sums)
        stats = [c.stats() for c in comms]
    stats_file = tmp_path / "stats.json"
    stats_file.write_text(json.dumps(stats))

    assert main(["cost", str(stats_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    peers = report["peers"]
    assert len(peers) == 4
    # Per peer: channel dollars are what the communicator itself computed (same model).
    for mine, theirs in zip(peers, stats, strict=True):
        for name, row in mine["channels"].items():
            assert row["usd"] == pytest.approx(theirs["channels"][name]["usd"], rel=1e-12)
            assert row["messages_sent"] == theirs["channels"][name]["messages_sent"]
        assert mine["faas_gb_seconds"] == pytest.approx(
            theirs["cost"]["seconds_open"] * theirs["cost"]["faas_memory_mb"] / 1024
        )
    # Totals are the sums over peers.
    total = report["total"]
    assert total["channels_usd"] == pytest.approx(sum(p["channels_usd"] for p in peers))
    assert total["faas_usd"] == pytest.approx(sum(p["faas_usd"] for p in peers))
    assert total["total_usd"] == pytest.approx(total["channels_usd"] + total["faas_usd"])
    redis_total = report["channels"]["redis"]
    assert redis_total["messages_sent"] == sum(
        s["channels"]["redis"]["messages_sent"] for s in stats
    )
    assert redis_total["messages_sent"] > 0 and redis_total["usd"] > 0
    for kind, count in redis_total["requests"].items():
        assert count == sum(s["channels"]["redis"]["requests"].get(kind, 0) for s in stats)

    # The text report shows the same numbers.
    assert main(["cost", str(stats_file)]) == 0
    text = capsys.readouterr().out
    assert text.count("peer ") >= 4 and "total over 4 peer(s)" in text
    assert "GB-s" in text and "redis" in text and "memory" in text


async def _run(comms: list[fmi.Communicator], x: np.ndarray) -> list[np.ndarray]:
    sums = await asyncio.gather(*(c.allreduce(x, channel="redis") for c in comms))
    await asyncio.gather(*(c.bcast(x if c.rank == 0 else None, channel="memory") for c in comms))
    return list(sums)


def test_cost_reprices_under_another_config(tmp_path: Path) -> None:
    stats = {
        "peer": 0,
        "channels": {
            "s3": {
                "messages_sent": 2,
                "bytes_sent": 2000,
                "requests": {"PutObject": 1000, "GetObject": 1000},
                "seconds": 0.5,
            }
        },
        "cost": {"seconds_open": 2.0, "faas_memory_mb": 1024},
    }
    default = cost_report([stats], CostModel(load_models({})))
    assert default["total"]["channels_usd"] == pytest.approx(
        1000 * 0.005 / 1000 + 1000 * 0.0004 / 1000
    )
    assert default["total"]["faas_gb_seconds"] == pytest.approx(2.0)
    pricier = cost_report(
        [stats], CostModel(load_models({"s3": {"upload_price": 1e-3, "download_price": 0}}))
    )
    assert pricier["total"]["channels_usd"] == pytest.approx(1.0)


@pytest.mark.parametrize("shape", ["object", "list", "keyed", "lines"])
def test_cost_reads_every_stats_layout(tmp_path: Path, shape: str) -> None:
    one = {"peer": 0, "channels": {"memory": {"messages_sent": 1}}, "cost": {}}
    two = {**one, "peer": 1}
    text = {
        "object": json.dumps(one),
        "list": json.dumps([one, two]),
        "keyed": json.dumps({"0": one, "1": two}),
        "lines": json.dumps(one) + "\n" + json.dumps(two) + "\n",
    }[shape]
    path = tmp_path / "stats.json"
    path.write_text(text)
    assert len(load_stats(path)) == (1 if shape == "object" else 2)


def test_cost_rejects_what_is_not_stats(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps([{"no": "channels"}]))
    with pytest.raises(ConfigError, match=r"comm\.stats"):
        load_stats(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="neither JSON nor JSON lines"):
        load_stats(path)


def _doc_samples(text: str) -> list[tuple[str, str]]:
    """``(command, output)`` of every code block that starts with ``$ fmi plan``."""
    blocks = re.findall(r"^```\n\$ (fmi plan [^\n]*)\n(.*?)^```$", text, re.S | re.M)
    return [(command, output) for command, output in blocks]


def test_the_docs_sample_plan_output_is_the_commands_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "selection.md"
    samples = _doc_samples(doc.read_text())
    assert len(samples) >= 2, "docs/selection.md lost its `$ fmi plan` samples"
    for command, documented in samples:
        capsys.readouterr()
        assert main(command.split()[1:]) == 0
        fresh = capsys.readouterr().out
        assert fresh == documented, (
            f"docs/selection.md is stale: paste the output of `{command}` under it:\n{fresh}"
        )
