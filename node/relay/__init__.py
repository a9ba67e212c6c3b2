"""Relays: members peers can dial carry connections to members they cannot (behind NAT); docs/nat.md."""
