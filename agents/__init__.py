"""Policy side of STEP: agents with ``reset()`` / ``act(obs)``, built by one factory."""

from agents.factory import make_agent

__all__ = ["make_agent"]
