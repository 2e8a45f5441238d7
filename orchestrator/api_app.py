"""The REST API and the browser console as a Ray Serve application (for a KubeRay
``RayService`` or ``serve run``).

applications:
  - name: lorafleet-api
    route_prefix: /api
    import_path: orchestrator.api_app:build

The console is then at ``/api/`` (its page calls the API by relative URLs, so any prefix
works). Settings come from each replica's environment, or from ``settings_json`` in the args
(``storage.settings.settings_for_nodes``: no secret in it; the node supplies its own).
"""

from __future__ import annotations

from typing import Any


def build(args: dict[str, Any]) -> Any:
    """One FastAPI ingress deployment over the environment's catalog and object store."""
    from ray import serve

    replicas = int(args.get("replicas", 1))
    settings_json = args.get("settings_json")

    def make_app() -> Any:  # built in the replica: catalog connections do not travel
        from orchestrator.api import create_app
        from storage.auth import admin_token_problem
        from storage.settings import load_settings, settings_on_node

        settings = settings_on_node(settings_json) if settings_json else load_settings()
        token = settings.api_token.get_secret_value() if settings.api_token else None
        problem = admin_token_problem(token)
        if problem is not None:  # the replica refuses to start; Serve reports why
            raise ValueError(problem)
        return create_app(settings)

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0})
    @serve.ingress(make_app)
    class LorafleetApi:
        """The jobs and catalog API (``/v1/fine_tuning/jobs``, ``/v1/adapters``) and the console."""

    return LorafleetApi.bind()  # type: ignore[attr-defined]  # serve.deployment adds bind
