"""The host: what every node has whatever its role (identity and trust, the DHT and member directory, the outgoing
channels, the gRPC server with its guards and health, /metrics, the node's record and heartbeat). Roles get its
`HostServices` and never the host itself.
"""
