"""Tooling around the services: the ``refundctl`` command, the demo, embedded Postgres and
Redis, the process runner and reconciliation. It may import every package of the project;
no package imports it, so nothing here ships into a service's code path."""
