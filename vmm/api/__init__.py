"""The Firecracker-compatible control plane: HTTP server (server), resources
(schema), routing table (routes), request handling (controller), metrics,
the process runner and a client."""
