"""The tensor codecs this version speaks, by name, without importing torch (config, records, status).

Order matters: on a tie, the earlier, more exact codec wins (node/dataplane/codec_agreement.py).
"""

CODEC_NAMES: tuple[str, ...] = ("raw", "bf16", "int8", "int4", "lowrank")
