"""Code that runs inside a cage: its init (root with only the capabilities to drop
to the agent's uids) and the harness (its own uid). Standard library only, so a
cage starts fast and the hive's code inside it is small."""
