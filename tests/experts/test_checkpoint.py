import json

import msgpack
import pytest
import torch

from experts.checkpoint import MANIFEST, WEIGHTS, load_expert, new_model
from experts.manifest import ChecksumError, Manifest
from experts.train import Identity, TrainConfig, train


@pytest.fixture
def trained(tmp_path, tiny_config, code_domain):
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=32, eval_windows=4)
    model = new_model(tiny_config, seed=0)
    result = train(model, code_domain.train, code_domain.dev, cfg, tmp_path / "ckpt",
                   Identity("code-expert", "code", "bytes-v1", extra={"method": "MHo-IHo"}), progress=False)
    return tmp_path / "ckpt", model, result.manifest


def test_manifest_round_trips_through_json_and_msgpack(trained):
    ckpt, _, manifest = trained
    on_disk = Manifest.from_dict(json.loads((ckpt / MANIFEST).read_text()))
    assert on_disk == manifest
    assert Manifest.from_dict(msgpack.unpackb(msgpack.packb(manifest.to_dict()))) == manifest
    assert manifest.steps == 2 and manifest.complete and manifest.tokens == 2 * 2 * 32
    assert manifest.config["intermediate_size"] == 64 and manifest.val_ppl > 1
    assert len(manifest.weights_sha256) == 64


def test_load_expert_gives_back_the_same_model(trained):
    ckpt, model, manifest = trained
    loaded, m = load_expert(ckpt)
    assert m == manifest
    x = torch.randint(0, 256, (1, 16))
    model.eval()
    assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)


def test_tampered_weights_are_refused(trained):
    ckpt, _, _ = trained
    raw = bytearray((ckpt / WEIGHTS).read_bytes())
    raw[-1] ^= 0xFF
    (ckpt / WEIGHTS).write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="does not match the manifest"):
        load_expert(ckpt)


def test_bad_manifests_are_refused(trained, tmp_path):
    ckpt, _, manifest = trained
    with pytest.raises(ValueError, match="no manifest.json"):
        load_expert(tmp_path)
    (ckpt / MANIFEST).write_text(json.dumps({**manifest.to_dict(), "format": "other"}))
    with pytest.raises(ValueError, match="not an expert manifest"):
        load_expert(ckpt)
    data = manifest.to_dict()
    del data["weights_sha256"]
    with pytest.raises(ValueError, match="lacks weights_sha256"):
        Manifest.from_dict(data)
