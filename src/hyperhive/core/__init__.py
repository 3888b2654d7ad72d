"""hive-core: the unprivileged daemon that holds all state and serves both protocols."""
