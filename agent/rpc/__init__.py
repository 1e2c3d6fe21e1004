"""gRPC layer only: thin conversion and error mapping.

    service.py     AgentServicer: requests -> engine / leases / watcher -> responses
    errors.py      the one exception -> status code mapping
    server.py      AgentServer: socket, health, reflection, TCP+mTLS, bridges hook, shutdown
    watch.py       one shared, event-driven scanner for every WatchReport stream
    health.py      grpc.health.v1, our own servicer
    reflection.py  server reflection (v1alpha and v1), our own servicer

What it serves lives elsewhere: the engine's port and the scan coalescer,
the event sources, logs and resource figures in agent/daemon; leases,
claims and link changes in agent/mutations; Listener in agent/transports.
"""
