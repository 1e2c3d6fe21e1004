"""The host side: agent client, hypervisor backends, planner, orchestrator, unplugctl."""
