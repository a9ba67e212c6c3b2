import pytest

from protocol.records import (CatalogueEntry, ExpertRecord, NodeRecord, RecordError, seed_id, vouch_value,
                              vouched_owner)

SHA = "ab" * 32


def expert_value(**over) -> dict:
    value = {"name": "e", "domain": "code", "config": {"hidden_size": 8}, "tokenizer": "bytes-v1", "seed_hash": "",
             "parent": None, "lineage": [SHA], "steps": 3, "target_steps": 9, "tokens": 10, "flops": 2.5,
             "val_ppl": 3.0, "weights_sha256": SHA, "extra": {}, "format": "swarm-node/expert-v1",
             "id": "code-1", "peer_id": "p", "endpoint": "h:1", "bytes": 100, "dev_loss": 1.1, "v": 1}
    value.update(over)
    return value


def test_expert_record_round_trip_keeps_the_manifest():
    record = ExpertRecord.from_value("code-1", expert_value())
    assert record.to_value() == expert_value()
    assert record.summary()["sha256"] == SHA and record.domain == "code" and not record.complete
    assert "peer_id" not in record.manifest and record.manifest["weights_sha256"] == SHA


@pytest.mark.parametrize("over", [{"id": "other"}, {"weights_sha256": "xyz"}, {"steps": "3"}, {"bytes": 0},
                                  {"lineage": [1]}, {"config": []}, {"dev_loss": "low"}, {"flops": None}])
def test_malformed_expert_records_are_rejected(over):
    with pytest.raises(RecordError):
        ExpertRecord.from_value("code-1", expert_value(**over))


def test_catalogue_entry_round_trip_and_validation():
    entry = CatalogueEntry("code", "/data/code.txt", SHA, 1000, 2.5, seed=seed_id(SHA), seed_sha256=SHA)
    assert CatalogueEntry.from_value("code", entry.to_value()) == entry
    value = entry.to_value()
    for name, bad in [("a/b", value), ("_owner", value), ("code", {**value, "sha256": "short"}),
                      ("code", {**value, "difficulty": 0}), ("code", "text"),
                      ("code", {**value, "difficulty": 1e9}),  # inflated: no zlib measure is that hard
                      ("code", {**value, "difficulty": float("nan")}),
                      ("code", {**value, "seed": "seed-1"}),  # a seed id that does not name its weights
                      ("code", {**value, "seed_sha256": "cd" * 32}),  # re-pointed weights under the same id
                      ("code", {**value, "seed": ""}),  # weights without a seed
                      ("code", {**value, "seed_sha256": ""})]:
        with pytest.raises(RecordError):
            CatalogueEntry.from_value(name, bad)


def test_expert_ids_are_bound_to_their_publisher_and_seed_ids_to_their_weights():
    peer = "QmPeerIdEndingIn12345678"
    ok = ExpertRecord.from_value("code-12345678-0", expert_value(id="code-12345678-0", peer_id=peer))
    assert ok.binding_error() is None
    other = ExpertRecord.from_value("code-87654321-0", expert_value(id="code-87654321-0", peer_id=peer))
    assert "publisher" in other.binding_error()
    seed = ExpertRecord.from_value(seed_id(SHA), expert_value(id=seed_id(SHA), domain="*", peer_id=peer))
    assert seed.binding_error() is None
    moved = ExpertRecord.from_value(seed_id(SHA), expert_value(id=seed_id(SHA), domain="*", peer_id=peer,
                                                                weights_sha256="cd" * 32))
    assert "weights" in moved.binding_error()


def test_planned_flops_is_read_defensively():
    assert ExpertRecord.from_value("code-1", expert_value(extra={"planned_flops": 7.0})).planned_flops == 7.0
    for junk in ("lots", True, None, [1]):
        assert ExpertRecord.from_value("code-1", expert_value(extra={"planned_flops": junk})).planned_flops == 0.0
    assert ExpertRecord.from_value("code-1", expert_value(extra=["planned_flops"])).planned_flops == 0.0


def test_a_catalogue_owner_note_names_a_peer():
    assert vouched_owner(vouch_value("QmOwner")) == "QmOwner"
    for bad in ({}, {"owner": ""}, {"owner": 3}, "QmOwner"):
        with pytest.raises(RecordError):
            vouched_owner(bad)


def test_an_expert_node_hosts_no_stage_but_a_stage_node_must():
    value = {"endpoint": "h:1", "stages": [], "compute_s": {}, "memory_slots": 8, "role": "expert",
             "version": "0.1.0", "swarm": "s", "round": 0, "state": "serving"}
    assert NodeRecord.from_value("p", value).stages == ()
    with pytest.raises(RecordError):
        NodeRecord.from_value("p", {**value, "role": "stage"})
