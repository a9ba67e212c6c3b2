"""Who may say what about the swarm's experts: the catalogue's owner, seed and expert ids, claims (unit tests;
the same forgeries against real processes are in test_experts_swarm.py)."""

from __future__ import annotations

import logging
import math

import pytest
from hivemind.utils import ValueWithExpiration
from hivemind.utils.crypto import RSAPrivateKey

from node.expert.claims import committed_flops
from node.expert.directory import ExpertDirectory
from node.expert.owner import CatalogueOwner, introducer_of
from protocol.record_auth import owner_peer_id
from protocol.records import CatalogueEntry, ExpertRecord, catalogue_key, experts_key, seed_id, vouch_value

SHA = "ab" * 32


def owner_marker() -> bytes:
    return b"[owner:" + RSAPrivateKey().get_public_key().to_bytes() + b"]"


class StoredDHT:
    """What `DHT.get(key, latest=True)` returns for records already validated by the DHT (signatures checked)."""

    def __init__(self, records: dict[str, dict]):
        self.records = records

    def get(self, key, latest=False):
        items = self.records.get(key)
        if items is None:
            return None
        return ValueWithExpiration({k: ValueWithExpiration(v, 0.0) for k, v in items.items()}, 0.0)


def entry(name: str, sha: str = SHA) -> dict:
    return CatalogueEntry(name, "/data", sha, 1000, 1.5, seed_id(SHA), SHA).to_value()


@pytest.fixture(scope="module")
def keys():
    return {name: owner_marker() for name in ("creator", "member", "attacker")}


def directory(records: dict, owner: CatalogueOwner):
    refused, malformed = [], []
    d = ExpertDirectory(StoredDHT(records), "s", owner, on_malformed=malformed.append, on_refused=refused.append)
    return d, refused, malformed


def test_only_the_owners_entries_are_the_catalogue(keys):
    creator, attacker = keys["creator"], keys["attacker"]
    records = {catalogue_key("s"): {b"code" + creator: entry("code"), b"code": entry("code", "ee" * 32),
                                    b"code" + attacker: entry("code", "ee" * 32), b"evil" + attacker: entry("evil"),
                                    b"_owner" + attacker: vouch_value(owner_peer_id(attacker))}}
    d, refused, _ = directory(records, CatalogueOwner(named=owner_peer_id(creator)))
    catalogue = d.catalogue()
    assert set(catalogue) == {"code"} and catalogue["code"].sha256 == SHA
    assert sorted(refused) == ["not_owner", "not_owner", "unowned"]
    assert d.trusted_owner == owner_peer_id(creator)


def test_a_forgery_is_counted_at_every_read_and_logged_as_a_warning_once(keys, caplog):
    records = {catalogue_key("s"): {b"evil" + keys["attacker"]: entry("evil")}}
    d, refused, _ = directory(records, CatalogueOwner(named=owner_peer_id(keys["creator"])))
    with caplog.at_level("DEBUG", logger="node.expert.directory"):
        for _ in range(3):
            assert d.catalogue() == {}
    assert refused == ["not_owner"] * 3
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    caplog.clear()  # a command (experts list|fetch) prints a count instead, and keeps stderr to its one error line
    quiet = ExpertDirectory(StoredDHT(records), "s", CatalogueOwner(named=owner_peer_id(keys["creator"])),
                            on_refused=refused.append, warn=False)
    with caplog.at_level("DEBUG", logger="node.expert.directory"):
        assert quiet.catalogue() == {}
    assert [r.levelno for r in caplog.records] == [logging.DEBUG] and refused[-1] == "not_owner"


def test_a_joiner_takes_the_owner_its_introducer_names(keys):
    creator, member, attacker = (owner_peer_id(keys[k]) for k in ("creator", "member", "attacker"))
    records = {catalogue_key("s"): {b"code" + keys["creator"]: entry("code"),
                                    b"_owner" + keys["member"]: vouch_value(creator),
                                    b"_owner" + keys["attacker"]: vouch_value(attacker)}}
    via_member = CatalogueOwner(introducer=introducer_of([f"/ip4/127.0.0.1/tcp/1/p2p/{member}"]))
    assert set(directory(records, via_member)[0].catalogue()) == {"code"}
    # Joined through the creator itself (it names nobody): the creator. Through the attacker: what it says,
    # which is why the operator chooses the peer to join through, or names --catalogue-owner.
    assert CatalogueOwner(introducer=creator).resolve({member: creator}) == creator
    assert CatalogueOwner(named=creator, introducer=attacker).resolve({attacker: attacker}) == creator
    assert introducer_of([]) == "" and introducer_of(["/ip4/1.2.3.4/tcp/1"]) == ""


def expert(peer: str, domain: str, n: int = 0, steps: int = 0, target: int = 10, flops: float = 0.0,
           planned: float = 100.0, sha: str = SHA) -> ExpertRecord:
    expert_id = seed_id(sha) if domain == "*" else f"{domain}-{peer[-8:]}-{n}"
    manifest = {"name": expert_id, "domain": domain, "config": {}, "tokenizer": "bytes-v1", "seed_hash": "",
                "parent": None, "lineage": [], "steps": steps, "target_steps": target, "tokens": 0,
                "flops": flops, "val_ppl": None, "weights_sha256": sha, "extra": {"planned_flops": planned},
                "format": "swarm-node/expert-v1"}
    return ExpertRecord(expert_id, peer, "h:1", 10, None, manifest)


def test_expert_records_must_be_signed_by_their_publisher_and_name_it(keys):
    member, attacker = owner_peer_id(keys["member"]), owner_peer_id(keys["attacker"])
    good, stolen, moved = expert(member, "code"), expert(member, "code", n=1), expert(attacker, "*", sha="cd" * 32)
    moved = ExpertRecord(seed_id(SHA), attacker, "h:1", 10, None, moved.manifest)  # the real seed's id, other bytes
    records = {experts_key("s", "code"): {good.id.encode() + keys["member"]: good.to_value(),
                                          stolen.id.encode() + keys["attacker"]: stolen.to_value()},
               experts_key("s", "*"): {moved.id.encode() + keys["attacker"]: moved.to_value()}}
    d, refused, _ = directory(records, CatalogueOwner())
    assert [r.id for r in d.experts(["code", "*"])] == [good.id]
    assert sorted(refused) == ["id", "unsigned"]


def test_claims_count_members_only_bounded_by_the_plan_and_one_unfinished_per_peer():
    limit = {"code": 100.0, "prose": 200.0}
    members = {"peer-honest1", "peer-member2"}
    records = [expert("peer-honest1", "code", planned=90.0),  # an honest claim: counts its plan
               expert("peer-attacker", "prose", planned=1e30),  # not a member: ignored
               expert("peer-member2", "prose", planned=1e30),  # inflated: clamped to the plan
               expert("peer-member2", "code", n=1, planned=50.0),  # a second open claim of one peer: ignored
               expert("peer-member2", "code", n=2, steps=10, flops=math.inf),  # finished, absurd FLOPs: clamped
               expert("peer-honest1", "code", n=3, steps=10, flops=-5.0),  # negative: counts nothing
               expert("peer-honest1", "*", steps=2, target=2, flops=7.0)]  # a seed: no domain's
    refused = []
    flops = committed_flops(records, limit, members, refused.append)
    assert flops == {"code": 90.0 + 100.0 + 0.0, "prose": 200.0}
    assert sorted(refused) == ["claim_clamped", "claim_clamped", "claim_clamped", "not_member", "second_claim"]
    # The caller's own claim and yielding claims are left out.
    assert committed_flops(records[:1], limit, members, refused.append, skip=lambda r: True) == \
        {"code": 0.0, "prose": 0.0}
