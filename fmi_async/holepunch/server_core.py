"""The rendezvous server's logic, sans-IO: every state transition of the server is in this file.

:class:`RendezvousCore` takes events (a request from a :class:`Link`, a
timer it asked for running out, a TCP connection opening or closing, a UDP
datagram to relay) and returns actions (send, close, splice two connections,
start or stop a timer; :mod:`~fmi_async.holepunch.server_actions`); time is
passed in.  The adapters (:mod:`~fmi_async.holepunch.server`) only move
bytes and run timers, so TCP and UDP go through the same transitions:

* **register**: the entry of ``(comm, run_id, peer)`` (address, whether a
  translator sits in between, owner), then the lookups waiting for it are
  answered.  Over UDP a peer is reachable where its datagrams come from.
  Without a secret an entry belongs to its first registrant while it lives
  and its owner is there (its connection open; over UDP, renewed within
  ``idle_timeout``); with one, every registrant proved membership and may
  replace it.  The register's link is the peer's *control link* for invites.
* **lookup**: answered at once, when the peer registers, or at ``timeout``.
* **join**: the sides of a pairing (:mod:`~fmi_async.holepunch.pairing`)
  hear each other's endpoints once both joined; the initiator's join (any
  side's over UDP) invites the other side on its control link.
* **result**: the verdict once both reported, or ``relay`` when one side is
  silent for ``result_timeout``; both hear the same.  A UDP pair decided
  ``relay`` is relayed between its two observed endpoints (0xF4 datagrams).
* **relay** (TCP, after a ``relay`` verdict): the first side waits up to
  ``relay_wait`` for the second, then both get ``ok`` and are spliced.
* **claim / refresh / release**: the job lease
  (:class:`~fmi_async.holepunch.leases.LeaseDesk` over
  :mod:`fmi_async.jobs.record`); a claim waits until its group formed, and
  the waiting claims of a record that changed are stepped again.
* **admission**: a TCP connection is unproven until its first complete
  request; over ``max_unproven`` (in all, or per source) the oldest unproven
  one is closed (:class:`~fmi_async.holepunch.admission.Admission`).

A refused proof, or a request the server does not serve, is answered and its
connection closed (no second guess).  Every table and every wait is bounded
(:class:`~fmi_async.holepunch.server_actions.ServerLimits`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Final

from ..errors import ConfigError
from . import messages as m
from .admission import Admission
from .leases import ClaimInProgress, LeaseDesk
from .net import Address
from .pairing import Pairing, PairingTable, PairKey
from .proofs import verify
from .registry import EntryKey, Registry
from .server_actions import (
    Action,
    Close,
    Link,
    Send,
    ServerLimits,
    Splice,
    StartTimer,
    StopTimer,
    Wait,
    WaitTable,
)

__all__ = ["RendezvousCore"]

logger = logging.getLogger(__name__)

_UNSPECIFIED_HOSTS = frozenset(("", "0.0.0.0", "::"))
_OVER_UDP: Final = (m.Register, m.Join, m.PunchResult)  # joins and results of UDP pairings
_OVER_TCP: Final = (*_OVER_UDP, m.Lookup, m.RelayJoin, m.Claim, m.Refresh, m.Release)
_AUTH_HINT: Final = (
    "invalid or missing proof: this peer's security.secret does not match the "
    "rendezvous server's secret"
)


class RendezvousCore:
    """Every decision of the rendezvous server (see the module doc); no I/O, time passed in.

    Raises :class:`~fmi_async.errors.ConfigError` without ``secret`` unless
    ``insecure``.
    """

    def __init__(
        self,
        secret: bytes | None = None,
        *,
        insecure: bool = False,
        limits: ServerLimits | None = None,
    ) -> None:
        if secret is not None and not secret:
            raise ConfigError("the rendezvous server's secret must not be empty")
        if secret is None and not insecure:
            raise ConfigError(
                "a rendezvous server needs a shared secret (RendezvousServer(secret=...), "
                "`fmi rendezvous --secret-file FILE`), or insecure=True (`--insecure`) to run "
                "without one, where anyone who can reach it may register, look up and join"
            )
        self.secret = secret
        self.limits = limits = limits or ServerLimits()
        self.registry = Registry(limits.ttl, limits.max_entries)
        self.pairings = PairingTable(
            join_timeout=limits.max_lookup_timeout,
            result_timeout=limits.result_timeout,
            relay_memory=limits.relay_memory,
            max_pairings=limits.max_pairings,
            max_relays=limits.max_relays,
            relay_idle_timeout=limits.relay_idle_timeout,
        )
        self.leases = LeaseDesk(
            default_wait=limits.default_lookup_timeout,
            max_wait=limits.max_lookup_timeout,
            max_records=limits.max_entries,
        )
        self.unproven: Admission[Link] = Admission(
            limits.max_unproven, limits.max_unproven_per_source
        )
        self.waits = WaitTable()
        self.pending = 0  # lookups waiting for their peer to register
        self.relays = 0  # TCP pairs spliced now
        self.relayed_bytes = 0
        self.relayed_datagrams = 0
        self._open: set[Link] = set()  # TCP connections
        self._controls: OrderedDict[tuple[m.Transport, EntryKey], Link] = OrderedDict()
        self._controlled: dict[Link, set[tuple[m.Transport, EntryKey]]] = {}
        self._spliced: dict[Link, Link] = {}

    def __repr__(self) -> str:
        return (
            f"<RendezvousCore entries={len(self.registry)} pending={self.pending} "
            f"connections={len(self._open)} pairings={len(self.pairings)} relays={self.relays}>"
        )

    def waiting(self, link: Link) -> bool:
        """Whether a request of ``link`` waits for its answer (its connection is not idle)."""
        return bool(self.waits.of_link(link))

    # ---------------------------------------------------------------- connections

    def opened(self, link: Link, now: float) -> list[Action]:
        """A TCP connection came in: admit it as unproven, evicting the oldest over the limits."""
        source = link.observed[0] if link.observed is not None else "?"
        out: list[Action] = [Close(old) for old in self.unproven.admit(link, source, now)]
        evicted = self.unproven.report(now)
        if evicted:
            logger.warning(
                "rendezvous: %d connection(s) that had sent no valid request evicted to make "
                "room (max_unproven=%d, max_unproven_per_source=%d; latest from %s)",
                evicted, self.unproven.max_total, self.unproven.max_per_source, source,
            )  # fmt: skip
        if len(self._open) >= self.limits.max_connections:
            logger.warning("rendezvous: too many connections, refusing one")
            self.unproven.settle(link)
            return [*out, Close(link)]
        self._open.add(link)
        return out

    def closed(self, link: Link, now: float) -> list[Action]:
        """A TCP connection ended: forget its control entries, its waits and its relay."""
        self.unproven.settle(link)
        self._open.discard(link)
        for key in self._controlled.pop(link, ()):
            if self._controls.get(key) == link:
                del self._controls[key]
        partner = self._spliced.pop(link, None)
        if partner is not None:
            self._spliced.pop(partner, None)
            self.relays -= 1
        out: list[Action] = []
        for wait in self.waits.of_link(link):
            if not isinstance(wait.message, m.Claim):  # a claim holds its slot until its deadline
                out.append(StopTimer(self._forget(wait).token))
        return out

    def taken(self, key: EntryKey, owner: object, now: float) -> bool:
        """Whether another registrant, still present, holds ``key`` (without a secret only).

        Present means: its connection is open (TCP), or it renewed within
        ``idle_timeout`` (UDP, where its source endpoint is its link).
        """
        if self.secret is not None:
            return False
        current = self.registry.owner(key, now)
        if current is None or current == owner:
            return False
        if isinstance(current, Link) and current.transport == "tcp":
            return current in self._open
        renewed = self.registry.renewed(key)
        return renewed is not None and now - renewed < self.limits.idle_timeout

    # ---------------------------------------------------------------- events

    def handle(self, message: m.Message, link: Link, now: float) -> list[Action]:
        """The actions one request calls for."""
        self.unproven.settle(link)  # a whole request came in time; one refused closes below
        rid = getattr(message, "id", None)
        udp = link.transport == "udp"
        if not isinstance(message, _OVER_UDP if udp else _OVER_TCP) or (
            udp and getattr(message, "transport", "udp") != "udp"
        ):
            text = f"the rendezvous server does not accept {message.TYPE!r} over {link.transport}"
            return self._refuse(link, "bad_request", text, rid)
        if not verify(message, self.secret):
            logger.warning(
                "rendezvous: rejected %s of peer %s from %s",
                message.TYPE, getattr(message, "peer", "?"), link.observed,
            )  # fmt: skip
            return self._refuse(link, "auth", _AUTH_HINT, rid)
        if isinstance(message, m.Register):
            return self._register(message, link, now)
        if isinstance(message, m.Lookup):
            return self._lookup(message, link, now)
        if isinstance(message, m.Join):
            return self._join(message, link, now)
        if isinstance(message, m.PunchResult):
            return self._result(message, link, now)
        if isinstance(message, m.RelayJoin):
            return self._relay(message, link, now)
        if isinstance(message, m.Claim):
            wait = self.waits.add(link, message, ("claim", message.comm, message.run_id), 0.0)
            wait.state = self.leases.claim(message, now)
            return [*self._step_claim(wait, now), *self._lease_changed(now)]
        if isinstance(message, m.Refresh):
            answer = self.leases.refresh(message, now)
        else:
            assert isinstance(message, m.Release)
            answer = self.leases.release(message, now)
        return [Send(link, answer), *self._lease_changed(now)]

    def timer(self, token: int, now: float) -> list[Action]:
        """A wait's timer ran out."""
        wait = self.waits.get(token)
        if wait is None:
            return []
        msg = wait.message
        if isinstance(msg, m.Claim):
            return [*self._step_claim(wait, now), *self._lease_changed(now)]
        self._forget(wait)
        if isinstance(msg, m.PunchResult):
            pairing = self.pairings.get(_pair_key(msg))
            if pairing is None:
                return []
            outcome = self.pairings.decide(pairing.key, "relay", now)  # a silent side failed
            answer = Send(wait.link, m.Verdict(outcome, msg.id))
            return [answer, *self._announce(pairing, now, msg.peer)]
        if isinstance(msg, m.RelayJoin):
            other = msg.responder if msg.peer == msg.initiator else msg.initiator
            text = f"peer {other} did not open its side of the relay"
            return self._refuse(wait.link, "timeout", text, msg.id, close=True)
        if isinstance(msg, m.Lookup):
            what, peer = "register", msg.peer
        else:
            assert isinstance(msg, m.Join)
            what = f"join the pairing {msg.initiator}->{msg.responder}"
            peer = msg.responder if msg.peer == msg.initiator else msg.initiator
        text = (
            f"peer {peer} of communicator {msg.comm!r} (run {msg.run_id}) did not {what} "
            f"within {wait.seconds:.3g}s; did it start, with the same comm name and run id?"
        )
        return [Send(wait.link, m.Error("timeout", text, msg.id))]

    def relay_target(self, nonce: bytes, source: Address, size: int, now: float) -> Address | None:
        """Where a relayed UDP datagram of ``size`` payload bytes goes, or None to drop it.

        Only for pairings decided ``relay``, and only from one of the two
        endpoints the pairing observed, so the server relays for nobody else;
        a relay idle for ``relay_idle_timeout`` is forgotten.
        """
        target = self.pairings.relay_target(nonce, source, now)
        if target is not None:
            self.relayed_datagrams += 1
            self.relayed_bytes += size
        return target

    # ---------------------------------------------------------------- registry

    def _register(self, msg: m.Register, link: Link, now: float) -> list[Action]:
        observed = link.observed
        if link.transport == "udp" and observed is not None:
            addr = observed  # a datagram peer is reachable where its datagrams come from
        else:
            addr = msg.addr
            if addr[0] in _UNSPECIFIED_HOSTS and observed is not None:
                # A peer listening on all interfaces is reachable where we saw it from.
                addr = (observed[0], addr[1])
        # A local endpoint that is not the observed one: a translator sits in between.
        nat = msg.local is not None and observed is not None and msg.local != observed
        key = (msg.comm, msg.run_id, msg.peer)
        if self.taken(key, link, now):
            logger.warning(
                "rendezvous: refused register of %s/%s peer %d from %s: another registrant "
                "holds it", msg.comm, msg.run_id, msg.peer, observed,
            )  # fmt: skip
            return self._refuse(link, "auth", _taken_hint(msg), msg.id)
        if not self.registry.register(key, addr, now, nat, link):
            text = (
                f"the rendezvous server holds {self.registry.max_entries} entries already; "
                "retry later or raise max_entries"
            )
            return [Send(link, m.Error("overloaded", text, msg.id))]
        logger.debug(
            "rendezvous: %s/%s peer %d at %s:%d%s",
            msg.comm, msg.run_id, msg.peer, *addr, " behind NAT" if nat else "",
        )  # fmt: skip
        control = (link.transport, key)  # invites for this peer go to this link
        self._controls[control] = link
        self._controls.move_to_end(control)
        self._controlled.setdefault(link, set()).add(control)
        while len(self._controls) > 2 * self.registry.max_entries:  # UDP ones never close
            oldest, gone = self._controls.popitem(last=False)
            self._controlled.get(gone, set()).discard(oldest)
        out: list[Action] = [Send(link, m.Ok(observed, self.registry.ttl, msg.id))]
        for wait in self.waits.waiting_for(("lookup", key)):
            answer = m.PeerInfo(msg.peer, addr, getattr(wait.message, "id", None), nat)
            out += [StopTimer(self._forget(wait).token), Send(wait.link, answer)]
        return out

    def _lookup(self, msg: m.Lookup, link: Link, now: float) -> list[Action]:
        key = (msg.comm, msg.run_id, msg.peer)
        addr = self.registry.get(key, now)
        if addr is not None:
            return [Send(link, m.PeerInfo(msg.peer, addr, msg.id, self.registry.behind_nat(key)))]
        if self.pending >= self.limits.max_pending:
            text = (
                f"the rendezvous server has {self.limits.max_pending} lookups waiting; retry later"
            )
            return [Send(link, m.Error("overloaded", text, msg.id))]
        self.pending += 1
        wait = self.waits.add(link, msg, ("lookup", key), self._timeout(msg.timeout))
        return [StartTimer(wait.token, wait.seconds)]

    # ---------------------------------------------------------------- pairing

    def _join(self, msg: m.Join, link: Link, now: float) -> list[Action]:
        if link.observed is None:
            return self._refuse(link, "bad_request", "a join needs an observable endpoint", msg.id)
        key = _pair_key(msg)
        for stale in self.pairings.expire(now):
            logger.debug("rendezvous: pairing %s expired undecided", stale.key)
        pairing = self.pairings.join(key, msg.peer, link.observed, msg.local, now, msg.id, link)
        if pairing is None:
            text = (
                f"the rendezvous server has {self.pairings.max_pairings} pairings open; retry later"
            )
            return [Send(link, m.Error("overloaded", text, msg.id))]
        out: list[Action] = [Send(link, m.EndpointReport(link.observed, msg.local, msg.id))]
        for earlier in self.waits.waiting_for(("join", key, msg.peer)):
            out.append(StopTimer(self._forget(earlier).token))  # joined again: the latest counts
        if not pairing.complete:
            if msg.peer == msg.initiator or msg.transport == "udp":
                out += self._invite(msg)
            wait = self.waits.add(link, msg, ("join", key, msg.peer), self._timeout(msg.timeout))
            return [*out, StartTimer(wait.token, wait.seconds)]
        # Both are in: each waiting side hears of the other (a pair relayed
        # lately is relayed again, and both hear it here, together).
        for peer in pairing.sides:
            other = pairing.other(peer)
            there = pairing.sides[other]
            targets = [(link, msg.id)] if peer == msg.peer else []
            for wait in self.waits.waiting_for(("join", key, peer)):
                out.append(StopTimer(self._forget(wait).token))
                targets.append((wait.link, getattr(wait.message, "id", None)))
            for target, rid in targets:
                answer = m.PeerEndpoint(
                    other, there.observed, there.local, pairing.nonce, rid, relay=pairing.reused
                )
                out.append(Send(target, answer))
        return out

    def _invite(self, msg: m.Join) -> list[Action]:
        target = msg.responder if msg.peer == msg.initiator else msg.initiator
        control = self._controls.get((msg.transport, (msg.comm, msg.run_id, target)))
        if control is None:
            logger.debug("rendezvous: peer %d has no control link to invite", target)
            return []
        logger.debug("rendezvous: inviting peer %d to pair with %d", target, msg.peer)
        invite = m.Invite(msg.comm, msg.run_id, msg.initiator, msg.responder, msg.transport)
        return [Send(control, invite)]

    def _result(self, msg: m.PunchResult, link: Link, now: float) -> list[Action]:
        key = _pair_key(msg)
        pairing = self.pairings.get(key)
        if pairing is None or msg.peer not in pairing.sides:
            text = f"pairing {msg.initiator}->{msg.responder} expired; join again"
            return [Send(link, m.Error("expired", text, msg.id))]
        outcome = self.pairings.report(key, msg.peer, msg.ok, now)
        if outcome is not None:
            return [Send(link, m.Verdict(outcome, msg.id)), *self._announce(pairing, now, msg.peer)]
        out: list[Action] = []
        for earlier in self.waits.waiting_for(("result", key, msg.peer)):
            out.append(StopTimer(self._forget(earlier).token))  # reported again
        reported = pairing.reported_at if pairing.reported_at is not None else now
        seconds = max(0.0, reported + self.pairings.result_timeout - now)
        wait = self.waits.add(link, msg, ("result", key, msg.peer), seconds)
        return [*out, StartTimer(wait.token, seconds)]

    def _announce(self, pairing: Pairing, now: float, told: int) -> list[Action]:
        """Tell the sides of a decided pairing its verdict (all but ``told``, who was)."""
        outcome = pairing.outcome
        assert outcome is not None
        udp = pairing.key[2] == "udp"  # a UDP relay opened with the verdict: data follows it
        out: list[Action] = []
        for peer, side in pairing.sides.items():
            waits = self.waits.waiting_for(("result", pairing.key, peer))
            for wait in waits:
                rid = getattr(wait.message, "id", None)
                out += [
                    StopTimer(self._forget(wait).token),
                    Send(wait.link, m.Verdict(outcome, rid)),
                ]
            if not waits and peer != told and udp and isinstance(side.link, Link):
                # Over UDP a side that has not reported hears it too (it may have lost
                # its answer); its join's request id is the one it matches answers by.
                out.append(Send(side.link, m.Verdict(outcome, side.request_id)))
        return out

    def _relay(self, msg: m.RelayJoin, link: Link, now: float) -> list[Action]:
        rkey = (msg.comm, msg.run_id, msg.initiator, msg.responder)
        if not self.pairings.relay_allowed(*rkey, now):
            text = f"no relay verdict for pairing {msg.initiator}->{msg.responder}; pair first"
            return self._refuse(link, "bad_request", text, msg.id)
        other = msg.responder if msg.peer == msg.initiator else msg.initiator
        partners = self.waits.waiting_for(("relay", rkey, other))
        if not partners:
            if self.relays >= self.limits.max_relays:
                text = f"the server relays {self.limits.max_relays} pairs already"
                return self._refuse(link, "overloaded", text, msg.id, close=True)
            wait = self.waits.add(link, msg, ("relay", rkey, msg.peer), self.limits.relay_wait)
            return [StartTimer(wait.token, wait.seconds)]
        partner = self._forget(partners[0])
        self._spliced[link], self._spliced[partner.link] = partner.link, link
        self.relays += 1
        logger.debug("rendezvous: relaying %s", rkey)
        return [
            StopTimer(partner.token),
            Send(link, m.Ok(id=msg.id)),
            Send(partner.link, m.Ok(id=getattr(partner.message, "id", None))),
            Splice(link, partner.link),
        ]

    # ---------------------------------------------------------------- leases

    def _step_claim(self, wait: Wait, now: float) -> list[Action]:
        assert isinstance(wait.state, ClaimInProgress)
        answer = self.leases.step(wait.state, now)
        if answer is not None:
            return [StopTimer(self._forget(wait).token), Send(wait.link, answer)]
        wait.seconds = max(0.0, wait.state.wake - now)
        return [StopTimer(wait.token), StartTimer(wait.token, wait.seconds)]

    def _lease_changed(self, now: float) -> list[Action]:
        """Step every waiting claim of a record that changed, until nothing changes."""
        out: list[Action] = []
        for _ in range(1000):  # each claim writes a few times at most: a bound, not a limit
            if not self.leases.changed:
                break
            keys, self.leases.changed = self.leases.changed, set()
            for comm, run_id in keys:
                for wait in self.waits.waiting_for(("claim", comm, run_id)):
                    out += self._step_claim(wait, now)
        return out

    # ---------------------------------------------------------------- helpers

    def _timeout(self, requested: float | None) -> float:
        wanted = self.limits.default_lookup_timeout if requested is None else requested
        return min(wanted, self.limits.max_lookup_timeout)

    def _forget(self, wait: Wait) -> Wait:
        if isinstance(wait.message, m.Lookup) and self.waits.get(wait.token) is not None:
            self.pending -= 1
        return self.waits.forget(wait)

    def _refuse(
        self, link: Link, code: m.ErrorCode, text: str, rid: int | None, *, close: bool = False
    ) -> list[Action]:
        """An error answer; refused proofs and requests, and relay refusals, close the link."""
        out: list[Action] = [Send(link, m.Error(code, text, rid))]
        if close or code in ("auth", "bad_request"):
            out.append(Close(link))
        return out


def _pair_key(msg: m.Join | m.PunchResult) -> PairKey:
    return (msg.comm, msg.run_id, msg.transport, msg.initiator, msg.responder)


def _taken_hint(msg: m.Register) -> str:
    return (
        f"peer {msg.peer} of communicator {msg.comm!r} (run {msg.run_id}) is registered "
        "already by another registrant that is still connected.  This server has no secret, "
        "so a registration belongs to whoever made it first until it expires or its "
        "connection closes.  If that is not an earlier run of this peer, someone else took "
        "its name: run the server with a secret (`fmi rendezvous --secret-file`) and give "
        "every peer the same security.secret"
    )
