"""The swarm: several hives as one over NATS JetStream (docs/swarm.md).

Only ``bridge`` and ``bus`` import ``nats``, and hive-core imports them only when
``[swarm]`` is configured: a single-host hive never loads the client.
"""
