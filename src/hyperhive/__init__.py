"""hyperhive: a swarm of AI agents on one host, each in its own cage."""

__version__ = "0.1.0"
