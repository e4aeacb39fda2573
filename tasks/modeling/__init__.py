"""The networks and what trains, scores and exports them: the registries of networks, optimizers and
strategies, the builders, backups, callbacks, scoring and exports."""
