"""The broker's HTTP children, each its own process and a client of the broker's frontend:
the Anthropic/OpenAI-compatible `gateway` (`isopool serve --http`) and the Prometheus
`metrics` endpoint (`isopool serve --metrics`). The broker starts them (`server.serve`)."""
