"""What may pass and how: the inbound guard, restricted routes, header rules, the route
table, and the JSON error answers."""
