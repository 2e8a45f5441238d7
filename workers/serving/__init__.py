"""Serving: batched multi-adapter inference (Ray Serve deployments come with the serving issue)."""

DEFAULT_SLOTS = 8  # adapter slots per replica: the one default (CLI, app args, options, engine)
