"""`python -m broker.server`: an embedded pool's owned broker (settings on stdin; see `serve`)."""

from .serve import main

main()
