"""What callers run in their own process: the low-level `Client`/`AsyncClient` (`client`)
and the embedded `Pool` that owns a broker child (`pool`). Import them from `broker`."""
