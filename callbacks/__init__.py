"""Lightning callbacks of selfmoe: routing statistics, heatmaps and per-token routing views."""

from callbacks.routing import RoutingStatsCallback, TokenRoutingCallback, finalize, routing_summary

__all__ = ["RoutingStatsCallback", "TokenRoutingCallback", "finalize", "routing_summary"]
