"""The ``fmi`` command: launcher and rendezvous server, with small scripts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fmi_async.config import Config
from fmi_async.errors import ConfigError
from fmi_async.holepunch.client import RendezvousClient
from fmi_async.tools.cli import COMMANDS, build_parser, main
from fmi_async.tools.launcher import merge_config

PID = re.compile(r"pid=(\d+)")


def script(tmp_path: Path, body: str, name: str = "peer.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_all_dead(pids: list[int], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "processes outlived the run"


SLEEPER = """
    import os, sys, time
    print(f"pid={os.getpid()}", flush=True)
    time.sleep(60)
"""


# ---------------------------------------------------------------- fmi run


def test_environment_and_prefixes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    peer = script(
        tmp_path,
        """
        import json, os, sys
        env = {k: v for k, v in os.environ.items() if k.startswith("FMI_")}
        print(json.dumps(env))
        print("to stderr", os.environ["FMI_PEER_ID"], file=sys.stderr)
        print("args", sys.argv[1:])
        """,
    )
    assert main(["run", "-n", "3", peer, "a", "--flag"]) == 0
    out, err = capsys.readouterr()
    envs = {}
    for line in out.splitlines():
        prefix, _, rest = line.partition("] ")
        if rest.startswith("{"):
            envs[int(prefix.removeprefix("[peer "))] = json.loads(rest)
        else:
            assert rest == "args ['a', '--flag']"
    assert sorted(envs) == [0, 1, 2]
    assert sorted(err.splitlines()) == [f"[peer {i}] to stderr {i}" for i in range(3)]
    run_ids = {e["FMI_RUN_ID"] for e in envs.values()}
    assert len(run_ids) == 1 and len(run_ids.pop()) >= 16
    for i, env in envs.items():
        assert env["FMI_PEER_ID"] == str(i) and env["FMI_NUM_PEERS"] == "3"
        assert env["FMI_COMM_NAME"] == "FMI_WORLD"
        config = Config.load(env["FMI_CONFIG"])
        assert config.enabled() == ["tcp"]
        assert config.options("tcp")["host"] == "127.0.0.1" and config.options("tcp")["port"] > 0
        assert config.secret is not None and len(config.secret) >= 32
    # By default every peer sits behind its own simulated NAT box.
    gateways = {e["FMI_NAT_GATEWAY"] for e in envs.values()}
    assert len(gateways) == 3 and all(g.startswith("127.0.0.1:") for g in gateways)
    # Every run gets its own run id and secret.
    assert main(["run", "-n", "1", peer]) == 0
    again = json.loads(capsys.readouterr().out.splitlines()[0].partition("] ")[2])
    assert again["FMI_RUN_ID"] not in {e["FMI_RUN_ID"] for e in envs.values()}
    assert again["FMI_CONFIG"] != envs[0]["FMI_CONFIG"]


def test_user_config_and_name_merged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_file = tmp_path / "fmi.json"
    config_file.write_text(
        json.dumps(
            {
                "timeout": 7,
                "backends": {"Direct": {"enabled": False, "max_timeout": 1234}},
                "model": {"Direct": {"bandwidth": 1}},
            }
        )
    )
    peer = script(
        tmp_path, "import os; print(os.environ['FMI_COMM_NAME'], os.environ['FMI_CONFIG'])"
    )
    assert main(["run", "-n", "1", "--config", str(config_file), "--name", "JOB", peer]) == 0
    name, _, config_json = capsys.readouterr().out.strip().partition("] ")[2].partition(" ")
    assert name == "JOB"
    data = json.loads(config_json)
    assert list(data["backends"]) == ["Direct"]  # merged into the user's key, not duplicated
    direct = data["backends"]["Direct"]
    # The user's options are kept, a disabled backend too (it gets the address all the same).
    assert direct["enabled"] is False and direct["max_timeout"] == 1234 and "host" in direct
    config = Config.load(config_json)
    assert config.timeout == 7 and config.model == {"tcp": {"bandwidth": 1}}


def test_merge_config_does_not_touch_input() -> None:
    user = {"backends": {"Redis": {"host": "r"}}, "security": {"secret": "old"}}
    merged = merge_config(user, "127.0.0.1", 5, "new")
    assert user == {"backends": {"Redis": {"host": "r"}}, "security": {"secret": "old"}}
    assert merged["backends"]["TCP"] == {"enabled": True, "host": "127.0.0.1", "port": 5}
    assert merged["backends"]["Redis"] == {"host": "r"}
    assert merged["security"] == {"secret": "new"}
    with pytest.raises(ConfigError):
        merge_config({"backends": []}, "h", 1, "s")


def test_exit_code_of_failing_peer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    peer = script(
        tmp_path,
        """
        import os, sys
        sys.exit(3 if os.environ["FMI_PEER_ID"] == "1" else 0)
        """,
    )
    assert main(["run", "-n", "3", peer]) == 3
    assert "peer 1 exited with code 3" in capsys.readouterr().err


def test_failing_peer_stops_the_others_and_their_children(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = script(
        tmp_path,
        """
        import os, subprocess, sys, time
        me = os.environ["FMI_PEER_ID"]
        if me == "0":
            time.sleep(0.5)  # let the others start and report
            sys.exit(5)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"pid={os.getpid()} pid={child.pid}", flush=True)
        time.sleep(60)
        """,
    )
    start = time.monotonic()
    assert main(["run", "-n", "4", peer]) == 5
    assert time.monotonic() - start < 10.0
    pids = [int(p) for p in PID.findall(capsys.readouterr().out)]
    assert len(pids) == 6  # three peers and one child each
    assert_all_dead(pids)


def test_peer_ignoring_sigterm_is_killed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = script(
        tmp_path,
        """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"pid={os.getpid()}", flush=True)
        if os.environ["FMI_PEER_ID"] == "0":
            time.sleep(0.5)
            sys.exit(1)
        time.sleep(60)
        """,
    )
    start = time.monotonic()
    assert main(["run", "-n", "2", "--grace", "0.3", peer]) == 1
    assert time.monotonic() - start < 8.0
    pids = [int(p) for p in PID.findall(capsys.readouterr().out)]
    assert len(pids) == 2
    assert_all_dead(pids)


def test_killed_peer_reports_signal(tmp_path: Path) -> None:
    peer = script(tmp_path, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert main(["run", "-n", "1", peer]) == 128 + signal.SIGKILL


def test_run_timeout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    peer = script(tmp_path, SLEEPER)
    start = time.monotonic()
    assert main(["run", "-n", "2", "--timeout", "1", peer]) == 124
    assert 0.9 < time.monotonic() - start < 8.0
    out, err = capsys.readouterr()
    assert "exceeded --timeout" in err
    pids = [int(p) for p in PID.findall(out)]
    assert len(pids) == 2
    assert_all_dead(pids)


def test_partial_lines_and_no_trailing_newline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    peer = script(
        tmp_path,
        """
        import sys, time
        sys.stdout.write("hel"); sys.stdout.flush(); time.sleep(0.1)
        sys.stdout.write("lo\\r\\nworld")
        """,
    )
    assert main(["run", "-n", "1", peer]) == 0
    assert capsys.readouterr().out == "[peer 0] hello\n[peer 0] world\n"


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-n", "2", str(tmp_path / "missing.py")]) == 2
    assert "not found" in capsys.readouterr().err
    peer = script(tmp_path, "print('never')")
    assert main(["run", "-n", "0", peer]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["run", "-n", "1", "--config", str(bad), peer]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    bad.write_text('{"nonsense": 1}')
    assert main(["run", "-n", "1", "--config", str(bad), peer]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main([]) == 2
    with pytest.raises(SystemExit):
        main(["run", peer])  # -n is required


def test_parser_has_room_for_more_commands() -> None:
    assert [c.name for c in COMMANDS][:2] == ["run", "rendezvous"]
    args = build_parser().parse_args(["run", "-n", "2", "s.py", "--x", "-n", "9"])
    assert args.script == "s.py" and args.args == ["--x", "-n", "9"] and args.num_peers == 2


def test_peers_reach_each_other_through_the_launchers_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end without the Communicator: TCP channels configured from the environment."""
    peer = script(
        tmp_path,
        """
        import asyncio, os
        from fmi_async.channels.base import ChannelContext
        from fmi_async.channels.mailbox import Mailbox
        from fmi_async.channels.tcp import TCPChannel
        from fmi_async.config import Config
        from fmi_async.wire import dumps, loads

        async def main():
            me, n = int(os.environ["FMI_PEER_ID"]), int(os.environ["FMI_NUM_PEERS"])
            config = Config.load(os.environ["FMI_CONFIG"])
            comm, run = os.environ["FMI_COMM_NAME"], os.environ["FMI_RUN_ID"]
            chan = TCPChannel(ChannelContext(me, n, comm, run, config, Mailbox(me)))
            await chan.open()
            try:
                await chan.send((me + 1) % n, ("u", 0), dumps(me * 10))
                got = loads(await chan.recv((me - 1) % n, ("u", 0), 20.0))
                print("got", got)
            finally:
                await chan.close()

        asyncio.run(main())
        """,
    )
    assert main(["run", "-n", "3", "--timeout", "30", peer]) == 0
    out = capsys.readouterr().out
    assert sorted(out.splitlines()) == [
        "[peer 0] got 20",
        "[peer 1] got 0",
        "[peer 2] got 10",
    ]


# ---------------------------------------------------------------- as a process (signals)


def _launch(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "fmi_async", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _read_lines(proc: subprocess.Popen[str], count: int, timeout: float = 15.0) -> list[str]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while len(lines) < count and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    return lines


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_the_launcher_stops_every_peer(tmp_path: Path, sig: signal.Signals) -> None:
    peer = script(tmp_path, SLEEPER)
    proc = _launch("run", "-n", "3", peer)
    try:
        lines = _read_lines(proc, 3)
        pids = [int(p) for p in PID.findall("".join(lines))]
        assert len(pids) == 3, lines
        start = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 130
        assert time.monotonic() - start < 8.0
        assert_all_dead(pids)
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_rendezvous_command(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("cli-secret\n")
    proc = _launch(
        "rendezvous", "--host", "127.0.0.1", "--port", "0", "--secret-file", str(secret_file)
    )
    try:
        line = _read_lines(proc, 1)[0]
        match = re.search(r"listening on 127\.0\.0\.1:(\d+) with a secret", line)
        assert match, line
        port = int(match.group(1))

        async def use() -> tuple[str, int]:
            client = RendezvousClient("127.0.0.1", port, b"cli-secret", timeout=5.0)
            await client.register("W", "r", 0, ("127.0.0.1", 1234))
            return await client.lookup("W", "r", 0, 1.0)

        assert asyncio.run(use()) == ("127.0.0.1", 1234)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert "stopped" in (proc.stdout.read() if proc.stdout else "")
    finally:
        proc.kill()
        proc.communicate(timeout=10)


def test_rendezvous_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert main(["rendezvous", "--port", "0", "--secret-file", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["rendezvous", "--port", "0", "--secret-file", str(tmp_path / "nope")]) == 2
    assert "cannot read the secret file" in capsys.readouterr().err


# The relayed case runs 3 peers: each relayed pair waits out its punch first.
@pytest.mark.parametrize(
    ("nat", "how", "n"), [("port-restricted", "direct", 4), ("symmetric", "relayed", 3)]
)
def test_run_behind_simulated_nat_reports_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nat: str, how: str, n: int
) -> None:
    peer = script(
        tmp_path,
        """
        import fmi_async as fmi

        async def main(comm):
            total = await comm.allreduce(comm.peer_id + 1)
            await comm.alltoall(list(range(comm.size)))  # every pair meets, both ways
            pairs = comm.stats()["channels"]["tcp"]["pairs"]
            print("total", total, sorted(set(pairs.values())))

        fmi.run(main)
        """,
    )
    assert main(["run", "-n", str(n), "--nat", nat, "--timeout", "60", peer]) == 0
    out, err = capsys.readouterr()
    lines = sorted(line.partition("] ")[2] for line in out.splitlines())
    assert lines == [f"total {n * (n + 1) // 2} ['{how}']"] * n
    (summary,) = [line for line in err.splitlines() if line.startswith("[fmi] NAT")]
    # Each of the n (n - 1) / 2 pairs counted once, whichever side connected first.
    pairs = n * (n - 1) // 2
    found = re.match(
        rf"\[fmi\] NAT {nat}: {pairs} pairs of {n} peers; tcp: (\d+) direct, (\d+) relayed, "
        r"(\d+) never connected",
        summary,
    )
    assert found is not None, summary
    counts = {"direct": int(found[1]), "relayed": int(found[2]), "never": int(found[3])}
    assert counts == {"direct": 0, "relayed": 0, "never": 0} | {how: pairs}, summary


def test_merge_config_fills_udp_and_runs_udp_alone_when_only_udp_is_named() -> None:
    merged = merge_config({"backends": {"UDP": {"mtu": 1400}}}, "127.0.0.1", 5, "s")
    assert merged["backends"] == {"UDP": {"mtu": 1400, "host": "127.0.0.1", "port": 5}}
    both = merge_config({"backends": {"UDP": {}, "Direct": {}}}, "127.0.0.1", 5, "s")
    assert both["backends"]["Direct"] == {"enabled": True, "host": "127.0.0.1", "port": 5}
    assert both["backends"]["UDP"] == {"host": "127.0.0.1", "port": 5}


@pytest.mark.parametrize(("nat", "how"), [("port-restricted", "direct"), ("symmetric", "relayed")])
def test_run_over_udp_behind_simulated_nat(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nat: str, how: str
) -> None:
    config = tmp_path / "udp.json"
    config.write_text(json.dumps({"backends": {"UDP": {"punch_timeout": 0.5}}}))
    peer = script(
        tmp_path,
        """
        import fmi_async as fmi

        async def main(comm):
            total = await comm.allreduce(comm.peer_id + 1)
            udp = comm.stats()["channels"]["udp"]
            print("total", total, sorted(set(udp["pairs"].values())), udp["messages_sent"] > 0)

        fmi.run(main)
        """,
    )
    argv = ["run", "-n", "3", "--nat", nat, "--config", str(config), "--timeout", "60", peer]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    lines = sorted(line.partition("] ")[2] for line in out.splitlines())
    assert lines == [f"total 6 ['{how}'] True"] * 3
