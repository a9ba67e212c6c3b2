"""Control messages carry their sender's signature, bound to the method and the receiver."""

import grpc
import pytest
from hivemind.utils.crypto import RSAPrivateKey

from protocol.errors import ProtocolError
from protocol.generated.swarm.v1 import stage_pb2 as pb
from protocol.notice_auth import NoticeSigner, verified_sender
from protocol.record_auth import peer_id_of_key

ORIGIN, OTHER = NoticeSigner(RSAPrivateKey()), NoticeSigner(RSAPrivateKey())
NOTICE = pb.RerouteNotice(swarm_id="s", round=3, microbatch=1, attempt=2, path=[pb.Hop(stage=0, peer_id="p")])


def refused(method, message, receiver) -> str:
    with pytest.raises(ProtocolError) as e:
        verified_sender(method, message, receiver)
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    return e.value.reason


def test_a_signed_notice_names_its_sender():
    signed = ORIGIN.sign("Reroute", NOTICE, "receiver")
    assert verified_sender("Reroute", signed, "receiver") == peer_id_of_key(ORIGIN.public_key)
    assert not NOTICE.HasField("sender")  # signing copies: one notice is signed for each receiver


def test_a_notice_verifies_only_as_signed():
    signed = ORIGIN.sign("Reroute", NOTICE, "receiver")
    assert "no sender proof" in refused("Reroute", NOTICE, "receiver")
    assert "does not verify" in refused("Reroute", signed, "another receiver")  # replayed elsewhere
    assert "does not verify" in refused("RoundDone", signed, "receiver")  # another method
    tampered = pb.RerouteNotice()
    tampered.CopyFrom(signed)
    tampered.attempt = 9
    assert "does not verify" in refused("Reroute", tampered, "receiver")
    borrowed = pb.RerouteNotice()  # someone else's key with the origin's signature
    borrowed.CopyFrom(signed)
    borrowed.sender.public_key = OTHER.public_key
    assert "does not verify" in refused("Reroute", borrowed, "receiver")
    garbage = pb.RerouteNotice()
    garbage.CopyFrom(signed)
    garbage.sender.public_key = b"not a key"
    assert "not an RSA key" in refused("Reroute", garbage, "receiver")
