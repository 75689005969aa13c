"""Sockets shared by the client, the broker and the workers: ZeroMQ frames (`zmqio`), a
socket driven by an asyncio loop's reader (`loopsock`) and CURVE encryption (`curve`)."""
