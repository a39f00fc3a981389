#!/usr/bin/env bash
# Regenerates the stubs (*_pb2.py, *_pb2.pyi, *_pb2_grpc.py) of jdisagg.proto (the public API)
# and internal.proto (the router <-> instance control plane).
#
#     jdisagg/proto/regenerate.sh
#
# grpcio-tools is pinned: stubs made by a grpcio-tools newer than the grpcio they run under
# refuse to import, and the oldest grpcio we serve with is 1.84.0. The pinned version is
# installed into its own virtual environment ($GRPCIO_TOOLS_VENV), created on first use.
# protoc runs from the repository root with `-I .`, so the service stub imports the
# messages as `from jdisagg.proto import jdisagg_pb2`.
set -euo pipefail

GRPCIO_TOOLS_VERSION=1.84.0
venv="${GRPCIO_TOOLS_VENV:-/tmp/grpcio-tools-$GRPCIO_TOOLS_VERSION}"

cd "$(dirname "$0")/../.."
if ! "$venv/bin/python" -c "import grpc_tools" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "grpcio-tools==$GRPCIO_TOOLS_VERSION"
fi
installed="$("$venv/bin/python" -c "from importlib.metadata import version; print(version('grpcio-tools'))")"
if [[ "$installed" != "$GRPCIO_TOOLS_VERSION" ]]; then
  echo "regenerate.sh: $venv has grpcio-tools $installed, want $GRPCIO_TOOLS_VERSION" >&2
  exit 1
fi
"$venv/bin/python" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  jdisagg/proto/jdisagg.proto jdisagg/proto/internal.proto
