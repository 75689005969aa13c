"""The broker process: one loop (`broker`) between clients and workers, with what it keeps
(`state`, `fairqueue`, `connections`, `stats`), decides (`watchdog`) and starts (`zygote`,
the handle on the zygote process of `worker.zygote`). `serve` runs it; `python -m
broker.server` is the embedded pool's owned child. Nothing here is imported by a client
or a worker."""
