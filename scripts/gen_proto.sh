#!/usr/bin/env bash
# Regenerate the gRPC API's protobuf code from client/proto/inference.proto (grpcio-tools, from
# the test extra). The generated files are committed; a test fails when they are stale.
set -euo pipefail
cd "$(dirname "$0")/../client/proto"
../../.venv/bin/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. inference.proto
