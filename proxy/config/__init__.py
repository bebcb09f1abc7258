"""Configuration: pure models, the sources they are read from, secrets read once, and
the listen addresses; the lowest layer, importing nothing else of the proxy."""
