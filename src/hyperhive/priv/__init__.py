"""hive-priv: the only root process besides the launcher. A short table of root
verbs (see ``verbs.py``), socket-activated only, callers checked with SO_PEERCRED."""
