"""The development stack: the supervisor behind ``up``, its stack file, and the embedded broker and
PostgreSQL it starts. Nothing here is needed in production, where compose or Kubernetes runs the
same processes against a real cluster."""
