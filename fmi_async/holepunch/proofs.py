"""Proofs of the shared secret: signed requests and the direct connections' challenge.

A request's ``proof`` is HMAC-SHA256(secret, canonical fields), where the
canonical fields are a msgpack array of the message type followed by the
fields its class lists in ``SIGNED`` (:mod:`~fmi_async.holepunch.messages`),
each as it travels on the wire, so a proof for one kind of message can never
be replayed as another.  Verification uses :func:`hmac.compare_digest`.

On a direct (or relayed) peer connection both sides prove membership by a
challenge-response over nonces from both sides (:func:`response_proof`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
from typing import Any

import msgpack

from .fields import kind_of
from .messages import Message

__all__ = ["compute_proof", "signed_fields", "sign", "verify", "response_proof"]

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
