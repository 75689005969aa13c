"""Sockets shared by the client, the broker and the workers: ZeroMQ frames (`zmqio`), a socket
shared by threads and drained by whoever reads it (`shared`) and CURVE encryption (`curve`)."""
