"""``fmi calibrate``: the fit, the measurement of real channels, and the config it writes
(the command through the ``fmi`` entry point)."""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest

from fmi_async.config import Config
from fmi_async.errors import ArgumentError, ConfigError
from fmi_async.selection.model import default_models, load_cost_model, load_models
from fmi_async.tools.calibrate import calibrate, calibrate_channel
from fmi_async.tools.calibration import ChannelCalibration, fit_line, models_from, write_models
from fmi_async.tools.cli import main
from fmi_async.tools.progress import progress_bar

KiB, MiB = 1024, 1024 * 1024
SIZES = [8, KiB, 64 * KiB, MiB, 4 * MiB]


# ---------------------------------------------------------------- the fit


def test_fit_recovers_overhead_and_bandwidth_exactly() -> None:
    times = [50e-6 + n / 2e9 for n in SIZES]
    overhead, bandwidth = fit_line(SIZES, times)
    assert overhead == pytest.approx(50e-6, rel=1e-6)
    assert bandwidth == pytest.approx(2e9, rel=1e-6)


def test_fit_weights_relative_error_so_small_sizes_keep_the_overhead() -> None:
    # 5% noise: plain least squares would let the 4 MiB point swamp the
    # overhead; relative weights keep it within the noise.
    rng = random.Random(7)
    times = [(20e-6 + n / 1e9) * (1 + rng.uniform(-0.05, 0.05)) for n in SIZES]
    overhead, bandwidth = fit_line(SIZES, times)
    assert overhead == pytest.approx(20e-6, rel=0.1)
    assert bandwidth == pytest.approx(1e9, rel=0.1)


def test_fit_never_returns_a_negative_overhead_or_bandwidth() -> None:
    # Falling times (noise at the small end) would give a negative intercept.
    overhead, bandwidth = fit_line([8, KiB, MiB], [30e-6, 10e-6, 1e-3])
    assert overhead > 0 and math.isfinite(overhead)
    assert bandwidth > 0 and math.isfinite(bandwidth)
    # No size dependence at all: "no measurable limit", still finite.
    overhead, bandwidth = fit_line([8, KiB, MiB], [1e-3, 1e-3, 1e-3])
    assert overhead == pytest.approx(1e-3)
    assert bandwidth == 1e12


def test_fit_rejects_mismatched_input() -> None:
    with pytest.raises(ArgumentError, match="as many times as sizes"):
        fit_line([8, 16], [1.0])


def test_bootstrap_spread_brackets_the_fit() -> None:
    rng = random.Random(1)
    cal = ChannelCalibration("memory", "direct", 2)
    cal.samples = {
        n: [(10e-6 + n / 1e9) * (1 + rng.uniform(-0.1, 0.1)) for _ in range(9)] for n in SIZES
    }
    cal.fit()
    lo, hi = cal.overhead_iqr
    assert lo <= hi and lo > 0
    assert cal.bandwidth_iqr[0] <= cal.bandwidth_iqr[1]
    assert cal.overhead == pytest.approx(10e-6, rel=0.2)


# ---------------------------------------------------------------- real channels


def _check(cal: ChannelCalibration) -> None:
    for value in (cal.overhead, cal.bandwidth, cal.aggregate_bandwidth):
        assert value > 0 and math.isfinite(value), cal
    assert all(len(ts) >= 3 for ts in cal.samples.values())
    entry = cal.model_entry()
    assert set(entry) == {"overhead_s", "bandwidth_Bps", "aggregate_bandwidth_Bps", "concurrency"}
    assert entry["concurrency"] >= 1


async def test_calibrate_memory_and_tcp_gives_positive_finite_parameters() -> None:
    results = await calibrate(
        Config(),
        ["memory", "tcp"],
        peers=2,
        sizes=[8, 64 * KiB, MiB],
        reps=3,
        budget=0.5,
        show_progress=False,
    )
    assert [r.channel for r in results] == ["memory", "tcp"]
    for cal in results:
        _check(cal)
        assert cal.unit == "message"
        # A loopback message is neither free nor slower than a tenth of a second.
        assert 1e-7 < cal.overhead < 0.1
    models = models_from(results)
    assert models["tcp"].overhead == pytest.approx(results[1].overhead, rel=1e-5)
    assert models["s3"] == default_models()["s3"]  # what was not measured keeps its default


async def test_calibrate_redis_halves_the_message_into_requests(redis_config: Config) -> None:
    cal = await calibrate_channel(
        "redis", redis_config, peers=3, sizes=[8, 64 * KiB], reps=3, budget=0.5
    )
    _check(cal)
    assert cal.unit == "request"
    assert cal.aggregate_size == 64 * KiB


async def test_storage_channel_without_a_backend_says_what_to_add() -> None:
    with pytest.raises(ConfigError, match=r"backends\.Redis"):
        await calibrate_channel("redis", Config(), sizes=[8], reps=3, budget=0.1)


# ---------------------------------------------------------------- writing the config


def _fake(channel: str, kind: str = "direct") -> ChannelCalibration:
    cal = ChannelCalibration(channel, kind, 2)
    cal.overhead, cal.bandwidth, cal.aggregate_bandwidth = 42e-6, 1.5e9, 3e9
    return cal


def test_write_keeps_the_rest_of_the_file_and_updates_fmi_entries_in_place(
    tmp_path: Path,
) -> None:
    path = tmp_path / "fmi.json"
    original = {
        "backends": {"Direct": {"enabled": True, "host": "127.0.0.1", "port": 10000}},
        "model": {"Direct": {"overhead": 0.34, "bandwidth": 400, "vm_price": 0.0042}},
        "timeout": 12,
    }
    path.write_text(json.dumps(original))
    write_models(path, [_fake("tcp"), _fake("memory")])
    data = json.loads(path.read_text())
    assert data["backends"] == original["backends"] and data["timeout"] == 12
    assert set(data["model"]) == {"Direct", "Memory"}  # FMI's name kept, not a second entry
    assert data["model"]["Direct"]["vm_price"] == 0.0042
    assert data["model"]["Direct"]["overhead_s"] == 42e-6
    models = load_models(Config.load(path).model)
    # Our keys win over FMI's milliseconds and MB/s.
    assert models["tcp"].overhead == pytest.approx(42e-6)
    assert models["tcp"].bandwidth == pytest.approx(1.5e9)
    assert models["tcp"].aggregate_bandwidth == pytest.approx(3e9)
    assert models["tcp"].infra_per_hour == pytest.approx(0.0042)
    assert models["memory"].overhead == pytest.approx(42e-6)


def test_write_refuses_a_broken_file_and_leaves_it_alone(tmp_path: Path) -> None:
    path = tmp_path / "fmi.json"
    path.write_text('{"model": [1, 2]}')
    with pytest.raises(ConfigError, match="model must be an object"):
        write_models(path, [_fake("memory")])
    assert path.read_text() == '{"model": [1, 2]}'
    with pytest.raises(ConfigError, match="cannot read config file"):
        write_models(tmp_path / "missing.json", [_fake("memory")])


def test_command_writes_a_config_that_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fmi.json"
    path.write_text(json.dumps({"timeout": 30}))
    argv = ["--config", str(path), "--channels", "memory,tcp", "--sizes", "8,64KiB,1MiB"]
    code = main(["calibrate", *argv, "--reps", "3", "--budget", "0.3", "--peers", "2", "--write"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "overhead (IQR)" in out and "memory" in out and "tcp" in out
    assert "calibrate" in err  # the progress bar
    config = Config.load(path)
    assert config.timeout == 30
    models = load_models(config.model)
    for name in ("memory", "tcp"):
        assert models[name] != default_models()[name]
        assert models[name].overhead > 0 and models[name].bandwidth > 0
    # The folding rate is measured and written next to the channels.
    assert "folding (numpy SUM" in out
    written = config.model["compute"]["reduce_bandwidth_Bps"]
    assert 1e6 < written < 1e12
    assert load_cost_model(config.model).reduce_bandwidth == written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--write"], "--write needs --config"),
        (["--channels", "carrier-pigeon"], "cannot calibrate"),
        (["--peers", "1"], "at least 2"),
        (["--sizes", "12 parsecs"], "cannot read the size"),
    ],
)
def test_command_errors_say_what_to_fix(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["calibrate", *argv, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


def test_progress_bar_into_a_file_writes_a_line_per_tenth() -> None:
    out = io.StringIO()
    bar = progress_bar(40, "calibrate", stream=out)
    for _ in range(40):
        bar.set_postfix_str("x", refresh=False)
        bar.update()
    bar.close()
    # Into a file the bar writes one status per tenth of the work (tqdm separates
    # them with carriage returns), plus its start and its final state.
    lines = [line for line in out.getvalue().splitlines() if line]
    assert 10 <= len(lines) <= 12
    assert lines[-1].startswith("calibrate") and "40/40" in lines[-1]


def test_progress_bar_disabled_writes_nothing() -> None:
    out = io.StringIO()
    bar = progress_bar(40, "calibrate", stream=out, enabled=False)
    bar.update()
    bar.close()
    assert out.getvalue() == ""
