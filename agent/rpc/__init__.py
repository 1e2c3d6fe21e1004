"""gRPC service layer: thin conversion and error mapping.

    service.py     AgentServicer: requests -> engine / leases / watcher -> responses
    errors.py      the one exception -> status code mapping
    server.py      AgentServer: socket, health, reflection, TCP+mTLS, bridges hook, shutdown
    engine_api.py  what the service needs from the engine (a Protocol; tests fake it)
    leases.py      PrepareUnplug leases: claims.py (O_EXCL by devno), links.py (interfaces down)
    watch.py       one shared, event-driven scanner for every WatchReport stream
    events.py      the kernel events it sleeps on (udev, rtnetlink, mountinfo POLLPRI, proc connector)
    health.py      grpc.health.v1, from grpcio-health-checking or a built-in copy
    reflection.py  server reflection (v1alpha and v1), our own so the guest has it too
    resources.py   the agent's own footprint (psutil) for GetAgentInfo
    logs.py        journald-friendly logging and sd_notify
"""
