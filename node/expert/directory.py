"""The swarm's experts in the DHT: the domain catalogue and one record per published expert.

Key schema in protocol/records.py. Every value is validated on read; a malformed one is skipped and
counted (the caller passes `on_malformed`, e.g. a metric), never trusted. An expert record sits under the
subkey `<expert id>[owner:...]` and is signed by its trainer (protocol/record_auth.py), so its `peer_id`
is proven: a record whose owner is not the peer it names is dropped as forged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from protocol.record_auth import owner_peer_id
from protocol.records import (TOMBSTONE, CatalogueEntry, ExpertRecord, RecordError, catalogue_key, experts_key,
                              is_tombstone)

log = logging.getLogger(__name__)


class ExpertDirectory:
    def __init__(self, dht: DHT, swarm: str, on_malformed: Callable[[str], None] = lambda what: None,
                 owner: bytes = b""):
        self.dht = dht
        self.swarm = swarm
        self.on_malformed = on_malformed
        self.owner = owner  # our owner subkey suffix (empty for a reader that never publishes)

    def _entries(self, key: str) -> dict:
        entry = self.dht.get(key, latest=True)
        if entry is None or not isinstance(entry.value, dict):
            return {}
        return {k: item.value for k, item in entry.value.items()}

    def _subkey(self, record: ExpertRecord) -> bytes:
        return record.id.encode() + self.owner

    # ---- catalogue ---------------------------------------------------------------------------------------------
    def catalogue(self) -> dict[str, CatalogueEntry]:
        out = {}
        for name, value in self._entries(catalogue_key(self.swarm)).items():
            name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
            try:
                out[name] = CatalogueEntry.from_value(name, value)
            except RecordError as e:
                log.warning("skipping a malformed catalogue entry %r: %s", name, e)
                self.on_malformed("catalogue")
        return out

    def publish_catalogue(self, entries: Iterable[CatalogueEntry], ttl: float) -> None:
        expiration = get_dht_time() + ttl
        for entry in entries:
            self.dht.store(catalogue_key(self.swarm), entry.to_value(), expiration, subkey=entry.name)

    # ---- experts -----------------------------------------------------------------------------------------------
    def experts(self, domains: Iterable[str]) -> list[ExpertRecord]:
        out = []
        for domain in domains:
            for subkey, value in self._entries(experts_key(self.swarm, domain)).items():
                if is_tombstone(value):
                    continue
                raw = subkey if isinstance(subkey, bytes) else str(subkey).encode()
                expert_id = raw.split(b"[owner:", 1)[0].decode(errors="replace")
                try:
                    record = ExpertRecord.from_value(expert_id, value)
                except RecordError as e:
                    log.warning("skipping a malformed expert record %s/%s: %s", domain, expert_id, e)
                    self.on_malformed("expert")
                    continue
                if owner_peer_id(raw) != record.peer_id:
                    log.warning("skipping expert %s: not signed by the peer it names", expert_id)
                    self.on_malformed("unsigned")
                    continue
                if record.domain != domain:
                    log.warning("skipping expert %s: published under %s but trained on %s", subkey, domain,
                                record.domain)
                    self.on_malformed("expert")
                    continue
                out.append(record)
        return sorted(out, key=lambda r: (r.domain, r.id))

    def all_experts(self) -> list[ExpertRecord]:
        """Every expert of every catalogue domain, and those branched-from seeds ("*")."""
        return self.experts([*sorted(self.catalogue()), "*"])

    def publish(self, record: ExpertRecord, ttl: float) -> bool:
        return bool(self.dht.store(experts_key(self.swarm, record.domain), record.to_value(), get_dht_time() + ttl,
                                   subkey=self._subkey(record)))

    def withdraw(self, record: ExpertRecord, ttl: float) -> bool:
        """A tombstone that outlives the record, so readers stop fetching from us at once."""
        return bool(self.dht.store(experts_key(self.swarm, record.domain), TOMBSTONE, get_dht_time() + ttl + 1,
                                   subkey=self._subkey(record)))
