"""Proofs of the shared secret: signed requests and the direct connections' challenge.

A request's ``proof`` is HMAC-SHA256(secret, canonical fields), where the
canonical fields are a msgpack array of the message type followed by the
fields its class lists in ``SIGNED`` (:mod:`~fmi_async.holepunch.messages`),
each as it travels on the wire, so a proof for one kind of message can never
be replayed as another.  Verification uses :func:`hmac.compare_digest`.

On a direct (or relayed) peer connection both sides prove membership by a
challenge-response over nonces from both sides (:func:`response_proof`).
The nonces of a handshake that passed are kept beside its socket
(:func:`remember_handshake`, :func:`take_handshake`), whichever way the
connection opened (plain, punched or relayed), and :func:`stream_key` derives
from them and the secret the key that seals the frames written on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import socket
import weakref
from dataclasses import dataclass
from typing import Any

import msgpack

from ..wire.seal import derive_key
from .fields import kind_of
from .messages import Message

__all__ = [
    "Handshake",
    "compute_proof",
    "remember_handshake",
    "response_proof",
    "sign",
    "signed_fields",
    "stream_key",
    "take_handshake",
    "verify",
]

logger = logging.getLogger(__name__)


def compute_proof(secret: bytes, fields: list[Any]) -> bytes:
    """HMAC-SHA256 of the canonical msgpack encoding of ``fields``."""
    data = msgpack.packb(fields, use_bin_type=True)
    return hmac.new(secret, data, hashlib.sha256).digest()


def signed_fields(message: Message) -> list[Any] | None:
    """The values a proof of ``message`` covers, or None for messages that carry no proof."""
    if message.SIGNED is None:
        return None
    kinds = {spec.name: kind_of(spec.metadata) for spec in dataclasses.fields(message)}
    out: list[Any] = [message.TYPE]
    for name in message.SIGNED.split():
        if name.startswith("*"):  # an address as two items, host and port
            host, port = getattr(message, name[1:])
            out += [host, port]
            continue
        value = getattr(message, name)
        out.append(None if value is None else kinds[name].pack(value))
    return out


def sign(message: Message, secret: bytes | None) -> Message:
    """``message`` with its proof filled in (unchanged without a secret or proof field)."""
    fields = signed_fields(message)
    if secret is None or fields is None:
        return message
    return dataclasses.replace(message, proof=compute_proof(secret, fields))  # type: ignore[call-arg]


def verify(message: Message, secret: bytes | None) -> bool:
    """True if ``message`` may be trusted under ``secret`` (anything goes without one)."""
    if secret is None:
        return True
    fields = signed_fields(message)
    proof = getattr(message, "proof", None)
    if fields is None or proof is None:
        return False
    return hmac.compare_digest(proof, compute_proof(secret, fields))


def response_proof(
    secret: bytes | None,
    comm: str,
    run_id: str,
    sender: int,
    receiver: int,
    receiver_nonce: bytes,
    sender_nonce: bytes,
) -> bytes:
    """The proof ``sender`` shows ``receiver`` on a direct connection.

    It covers the communicator, the run, both identities and the nonces of
    *both* sides, so it can neither be replayed on another connection nor be
    reflected back at its author.  Without a secret the key is empty: the
    proof then only shows the comm name and run id, which is all such a run
    has to check.
    """
    fields = ["response", comm, run_id, sender, receiver, receiver_nonce, sender_nonce]
    return compute_proof(secret or b"", fields)


@dataclass(frozen=True)
class Handshake:
    """The nonces of a membership handshake that passed, and who writes to whom.

    The committer (``writer``) is the only side that writes frames on the
    connection; ``reader`` only reads them.
    """

    writer: int
    reader: int
    writer_nonce: bytes
    reader_nonce: bytes

    def __repr__(self) -> str:  # the nonces are public, but say nothing useful
        return f"Handshake({self.writer} -> {self.reader})"


# A side table rather than a return value: every path that opens a connection
# (plain, punched, relayed) hands the channel a socket, and the socket is the
# one thing they all carry.  Weak keys: a socket closed and dropped takes its entry.
_HANDSHAKES: weakref.WeakKeyDictionary[socket.socket, Handshake] = weakref.WeakKeyDictionary()


def remember_handshake(sock: socket.socket, handshake: Handshake) -> None:
    """Keep the nonces of the handshake that ``sock`` passed, for :func:`take_handshake`."""
    _HANDSHAKES[sock] = handshake


def take_handshake(sock: socket.socket) -> Handshake | None:
    """The handshake ``sock`` passed (once), or None if it passed none."""
    return _HANDSHAKES.pop(sock, None)


def stream_key(secret: bytes, comm: str, run_id: str, handshake: Handshake) -> bytes:
    """The key of the frames ``handshake.writer`` writes to ``handshake.reader``.

    HKDF over the secret, salted with both sides' fresh nonces (the writer's
    first), with the job and the direction in the info: it differs per
    connection and per direction, and only members can derive it.
    """
    return derive_key(
        secret,
        "stream",
        comm,
        run_id,
        handshake.writer,
        handshake.reader,
        handshake.writer_nonce + handshake.reader_nonce,
    )
