import pytest

from protocol.records import CatalogueEntry, ExpertRecord, NodeRecord, RecordError

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
    entry = CatalogueEntry("code", "/data/code.txt", SHA, 1000, 2.5, seed="seed-1")
    assert CatalogueEntry.from_value("code", entry.to_value()) == entry
    for name, value in [("a/b", entry.to_value()), ("code", {**entry.to_value(), "sha256": "short"}),
                        ("code", {**entry.to_value(), "difficulty": 0}), ("code", "text")]:
        with pytest.raises(RecordError):
            CatalogueEntry.from_value(name, value)


def test_an_expert_node_hosts_no_stage_but_a_stage_node_must():
    value = {"endpoint": "h:1", "stages": [], "compute_s": {}, "memory_slots": 8, "role": "expert",
             "version": "0.1.0", "swarm": "s", "round": 0, "state": "serving"}
    assert NodeRecord.from_value("p", value).stages == ()
    with pytest.raises(RecordError):
        NodeRecord.from_value("p", {**value, "role": "stage"})
