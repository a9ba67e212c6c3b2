"""Roles: what a node does with its host. `choice` decides which role a node takes; `stage` hosts pipeline
stages (and, on stage 0, the data and the origin); `expert` trains HDEE domain experts. Each role is built
from the host's `HostServices` and the node's settings, hands the host the gRPC handlers it serves and
what its record advertises, and never holds the host or another role."""
