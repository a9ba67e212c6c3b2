"""The swarm's experts in the DHT: the domain catalogue and one record per published expert.

Key schema in protocol/records.py. Every value is validated on read; a malformed one is skipped and counted
(`on_malformed`), a forged one is refused and counted (`on_refused`, with the reason), never trusted:

- Catalogue entries sit under `<domain>[owner:...]`, signed by the catalogue's owner (node/expert/owner.py);
  an entry under any other subkey is refused (`unowned`, `not_owner`).
- An expert record sits under `<expert id>[owner:...]`, signed by its trainer (protocol/record_auth.py), so its
  `peer_id` is proven: a record whose owner is not the peer it names is refused (`unsigned`), and so is one whose
  id does not name its publisher, or for a seed its weights (`id`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from node.expert.owner import CatalogueOwner
from protocol.record_auth import split_owned
from protocol.records import (SEED_DOMAIN, TOMBSTONE, VOUCH, CatalogueEntry, ExpertRecord, RecordError,
                              catalogue_key, experts_key, is_tombstone, vouch_value, vouched_owner)

log = logging.getLogger(__name__)

Report = Callable[[str], None]


class _Repeats:
    """Which refusals the previous read of a key found too: those are logged at debug level, not again as
    warnings every heartbeat. Remembers one read's worth per key, so forged records cannot fill memory."""

    def __init__(self) -> None:
        self._before: dict[str, set] = {}
        self._now: dict[str, set] = {}

    def start(self, key: str) -> None:
        self._before[key], self._now[key] = self._now.get(key, set()), set()

    def seen(self, key: str, item) -> bool:
        self._now[key].add(item)
        return item in self._before[key]


class ExpertDirectory:
    def __init__(self, dht: DHT, swarm: str, catalogue_owner: CatalogueOwner,
                 on_malformed: Report = lambda kind: None, on_refused: Report = lambda reason: None,
                 owner: bytes = b"", warn: bool = True):
        """`warn`: log each skipped record as a warning (a node) or only at debug level (a command, which prints
        a count and keeps its error output to one line)."""
        self.dht = dht
        self.swarm = swarm
        self.catalogue_owner = catalogue_owner
        self.on_malformed = on_malformed
        self.on_refused = on_refused
        self.warn = warn
        self.owner = owner  # our owner subkey suffix (empty for a reader that never publishes)
        self.trusted_owner = ""  # the catalogue owner found by the last read
        self._repeats = _Repeats()

    def _entries(self, key: str) -> dict:
        entry = self.dht.get(key, latest=True)
        if entry is None or not isinstance(entry.value, dict):
            return {}
        return {k: item.value for k, item in entry.value.items()}

    def _subkey(self, name: str) -> bytes:
        return name.encode() + self.owner

    def _skip(self, key: str, subkey, count: Report, what: str, message: str, *args) -> None:
        """Count a malformed or refused record (`what`: its kind or the reason) and say why."""
        quiet = self._repeats.seen(key, (subkey, what)) or not self.warn
        log.log(logging.DEBUG if quiet else logging.WARNING, message, *args)
        count(what)

    # ---- catalogue ---------------------------------------------------------------------------------------------
    def catalogue(self) -> dict[str, CatalogueEntry]:
        """The owner's entries; every other one is refused. Also sets `trusted_owner`."""
        key = catalogue_key(self.swarm)
        self._repeats.start(key)
        vouches, signed = {}, []
        for subkey, value in self._entries(key).items():
            name, signer = split_owned(subkey)
            if signer is None:
                self._skip(key, subkey, self.on_refused, "unowned", "refusing catalogue entry %r: not signed by anyone",
                           name)
            elif name == VOUCH:
                try:
                    vouches[signer] = vouched_owner(value)
                except RecordError as e:
                    self._skip(key, subkey, self.on_malformed, "catalogue",
                               "skipping a malformed catalogue owner note of %s: %s", signer, e)
            else:
                signed.append((subkey, name, signer, value))
        owner = self.trusted_owner = self.catalogue_owner.resolve(vouches)
        out = {}
        for subkey, name, signer, value in signed:
            if signer != owner:
                self._skip(key, subkey, self.on_refused, "not_owner",
                           "refusing catalogue entry %r signed by %s: the catalogue belongs to %s", name, signer,
                           owner or "nobody known yet")
                continue
            try:
                out[name] = CatalogueEntry.from_value(name, value)
            except RecordError as e:
                self._skip(key, subkey, self.on_malformed, "catalogue", "skipping a malformed catalogue entry %r: %s",
                           name, e)
        return out

    def publish_catalogue(self, entries: Iterable[CatalogueEntry], ttl: float) -> None:
        """Sign and store our entries (only the owner's count)."""
        expiration = get_dht_time() + ttl
        for entry in entries:
            self.dht.store(catalogue_key(self.swarm), entry.to_value(), expiration, subkey=self._subkey(entry.name))

    def vouch(self, owner: str, ttl: float) -> None:
        """Say whose catalogue we trust, for nodes that join through us."""
        self.dht.store(catalogue_key(self.swarm), vouch_value(owner), get_dht_time() + ttl,
                       subkey=self._subkey(VOUCH))

    # ---- experts -----------------------------------------------------------------------------------------------
    def experts(self, domains: Iterable[str]) -> list[ExpertRecord]:
        out = []
        for domain in domains:
            key = experts_key(self.swarm, domain)
            self._repeats.start(key)
            for subkey, value in self._entries(key).items():
                if is_tombstone(value):
                    continue
                expert_id, signer = split_owned(subkey)
                try:
                    record = ExpertRecord.from_value(expert_id, value)
                except RecordError as e:
                    self._skip(key, subkey, self.on_malformed, "expert", "skipping a malformed expert record %s/%s: %s",
                               domain, expert_id, e)
                    continue
                if signer != record.peer_id:
                    self._skip(key, subkey, self.on_refused, "unsigned",
                               "refusing expert %s: not signed by the peer it names", expert_id)
                    continue
                if record.domain != domain:
                    self._skip(key, subkey, self.on_malformed, "expert",
                               "skipping expert %s: published under %s but trained on %s", expert_id, domain,
                               record.domain)
                    continue
                wrong = record.binding_error()
                if wrong is not None:
                    self._skip(key, subkey, self.on_refused, "id", "refusing expert %s of %s: %s", expert_id, signer,
                               wrong)
                    continue
                out.append(record)
        return sorted(out, key=lambda r: (r.domain, r.id))

    def all_experts(self) -> list[ExpertRecord]:
        """Every expert of every catalogue domain, and the seeds they branched from ("*")."""
        return self.experts([*sorted(self.catalogue()), SEED_DOMAIN])

    def publish(self, record: ExpertRecord, ttl: float) -> bool:
        return bool(self.dht.store(experts_key(self.swarm, record.domain), record.to_value(), get_dht_time() + ttl,
                                   subkey=self._subkey(record.id)))

    def withdraw(self, record: ExpertRecord, ttl: float) -> bool:
        """A tombstone that outlives the record, so readers stop fetching from us at once."""
        return bool(self.dht.store(experts_key(self.swarm, record.domain), TOMBSTONE, get_dht_time() + ttl + 1,
                                   subkey=self._subkey(record.id)))
