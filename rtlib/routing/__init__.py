"""Routing: assignment, routing attention, online k-means and the explicit routing state."""

from rtlib.routing.assign import balanced_members, centroid_scores, nearest_cluster, normalize
from rtlib.routing.attention import routing_attention
from rtlib.routing.kmeans import KMeansState, kmeans_init, kmeans_update
from rtlib.routing.reference import routing_attention_dense, routing_visibility
from rtlib.routing.state import RoutingState, sum_stats, update_routing_state
from rtlib.routing.stats import RoutingStats

__all__ = [
    "KMeansState",
    "RoutingState",
    "RoutingStats",
    "balanced_members",
    "centroid_scores",
    "kmeans_init",
    "kmeans_update",
    "nearest_cluster",
    "normalize",
    "routing_attention",
    "routing_attention_dense",
    "routing_visibility",
    "sum_stats",
    "update_routing_state",
]
