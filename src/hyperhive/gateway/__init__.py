"""The gateway: nginx in front of the core and every agent's page, on one origin.
Its workers run as the unprivileged ``hive-gateway`` user."""
