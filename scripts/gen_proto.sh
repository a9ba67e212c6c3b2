#!/usr/bin/env bash
# Regenerates protocol/generated/ from proto/. The generated code is committed, so installing
# swarm-node needs no protoc; tests/test_proto_generated.py fails if it is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-protocol/generated}
"${PYTHON:-python}" -m grpc_tools.protoc -I proto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    proto/swarm/v1/stage.proto proto/swarm/v1/experts.proto proto/swarm/v1/relay.proto
# protoc writes absolute imports (`from swarm.v1 import ...`); make them package-relative.
sed -i 's/^from swarm\.v1 import \(stage\|experts\|relay\)_pb2/from protocol.generated.swarm.v1 import \1_pb2/' \
    "$out/swarm/v1/stage_pb2_grpc.py" "$out/swarm/v1/experts_pb2_grpc.py" "$out/swarm/v1/relay_pb2_grpc.py"
touch "$out/__init__.py" "$out/swarm/__init__.py" "$out/swarm/v1/__init__.py"
