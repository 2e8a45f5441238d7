"""Serving: batched multi-adapter inference (Ray Serve deployments come with the serving issue)."""
