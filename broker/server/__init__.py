"""The broker process: one loop (`broker`) between clients and workers, which hands the
workers' lifecycle to `fleet` and the requests to `flow`, with what they keep (`state`,
`fairqueue`, `connections`, `stats`), decide (`watchdog`) and start (`zygote`, the handle
on the zygote process of `worker.zygote`). `serve` runs it; `python -m
broker.server` is the embedded pool's owned child. Nothing here is imported by a client
or a worker."""
