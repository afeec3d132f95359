"""The rendezvous protocol in one import: its messages, codec and proofs.

Sans-IO throughout: nothing here touches a socket; the server, the clients
and the TCP channel's handshake drive it with bytes they read themselves.
Each part lives in its own module; this one gathers them under one name
(``from fmi_async.holepunch import protocol as p``) and gives the overview:

* :mod:`~fmi_async.holepunch.messages`: every message type and its fields,
  declared once, with the kind of each field;
* :mod:`~fmi_async.holepunch.codec`: the envelope (magic, version, length),
  its limits, and bytes to messages and back;
* :mod:`~fmi_async.holepunch.proofs`: HMAC proofs over the signed fields,
  and the challenge-response of direct connections;
* :mod:`~fmi_async.holepunch.error_codes`: what each ``error`` code means
  to a client.

Message types (requests -> answers):

* ``register`` (comm, run_id, peer, addr, proof) -> ``ok`` or ``error``
* ``lookup``   (comm, run_id, peer, timeout, proof) -> ``peer`` or ``error``
* ``hello``    (comm, run_id, peer, dst, proof): first message of a direct
  connection between two peers, so the receiver knows who is talking.

NAT traversal (see ``docs/holepunching.md``):

* ``join``     (comm, run_id, peer, initiator, responder, transport, local,
  timeout, proof) -> ``endpoint`` at once, then ``peer_endpoint`` when the
  other side joined (or ``error``).  A pairing is named by
  ``(comm, run_id, transport, initiator, responder)``.
* ``endpoint`` (public, local): the endpoint the server *observed* for this
  join (the NAT's mapping) and the local one the peer reported.
* ``peer_endpoint`` (peer, public, local, nonce, relay): the other side's
  endpoints and a per-pairing nonce both sides share; ``relay`` true when the
  server already decided ``relay`` for the pair (no punching, no ``result``).
* ``invite``   (comm, run_id, initiator, responder, transport): pushed on a
  responder's control connection so it joins a pairing it did not ask for.
* ``result``   (comm, run_id, peer, initiator, responder, transport, ok,
  proof) -> ``verdict`` (outcome ``direct`` or ``relay``): the server decides
  ``direct`` only if both sides report success, and tells both the same.
* ``relay``    (comm, run_id, peer, initiator, responder, proof) -> ``ok``,
  then the connection is spliced to the other side's relay connection.
* ``challenge`` (comm, run_id, peer, dst, nonce) and ``response`` (peer,
  proof, commit): the membership proof on every direct connection, a
  challenge-response over nonces from both sides.

Job leases (see :mod:`fmi_async.jobs.record`):

* ``claim``   (comm, run_id, peer, num_peers, nonce, wait, ttl, settle,
  timeout, proof) -> ``lease`` (epoch, ttl) once all ``num_peers`` peers
  claimed, or ``error``: ``conflict`` (another job holds the name, or two
  opened it at once), ``mismatch`` (num_peers differ), ``busy`` (waited for
  another job until the timeout), ``timeout`` (peers missing).
* ``refresh`` (comm, run_id, peer, num_peers, epoch, nonce, ttl, proof) ->
  ``ok`` or ``error`` (``expired``: the lease was lost).
* ``release`` (comm, run_id, peer, epoch, nonce, proof) -> ``ok``.

Every request may carry an ``id`` which the answer echoes; a client that
pipelines several requests on one connection matches answers by it.  New
message types are added on the same envelope; the version byte changes only
if the envelope itself changes.
"""

from __future__ import annotations

from . import codec, messages, proofs
from .codec import *  # noqa: F403 - this module is the protocol's one import
from .messages import *  # noqa: F403
from .proofs import *  # noqa: F403

__all__ = [*codec.__all__, *messages.__all__, *proofs.__all__]
