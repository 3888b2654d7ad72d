"""The demo swarm's agent program (a `command` runtime; no LLM)."""
