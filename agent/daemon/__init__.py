"""What the running agent needs besides its gRPC layer (rpc/) and its judgement (engine, readiness).

events.py     the kernel events the watcher sleeps on (udev, rtnetlink, mountinfo POLLPRI, proc connector)
scans.py      what the service needs from the engine (EngineApi) and the scan coalescer
logs.py       journald-friendly logging and sd_notify
resources.py  the agent's own footprint (psutil) for GetAgentInfo
footprint.py  what `unplugd serve` keeps out of its memory (asyncio without ssl, one malloc arena, malloc_trim)
"""
