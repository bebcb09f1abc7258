"""Appcircle credentials: each kind of key, one key-for-token exchange, the token cache and
its renewal loop, and the local tokens the proxy hands out for exchanges it answers."""
