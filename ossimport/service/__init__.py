"""The service: an HTTP API (JSON door and Alibaba Cloud OpenAPI RPC door), streaming dataflows
and a web UI over the job system and the engine. Started by `ossimport serve`."""
