"""The jdisagg.v1 gRPC API: ``jdisagg.proto`` and the stubs generated from it by ``regenerate.sh``."""
