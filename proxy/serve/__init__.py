"""Serving: the listeners and workers, the request handler and what it hands requests to
(forward, WebSocket, userinfo, MCP, local exchange), the admin endpoints, start and stop."""
