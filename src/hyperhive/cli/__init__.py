"""The ``hive`` command: thin click front-ends over the sockets (and ``hive up``)."""
