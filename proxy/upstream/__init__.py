"""The forwarding client: one HTTP/1.1 connection to the API (asyncio protocol + httptools),
the response framing and limits, admission and the keep-alive pool, the egress proxy."""
