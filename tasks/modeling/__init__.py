"""The networks and what trains, scores and exports them: the network registry, optimizers, distribution strategies, callbacks."""
