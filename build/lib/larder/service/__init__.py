"""The HTTP service: aiohttp app, routes per protocol, auth, error mapping, config, CLI."""
